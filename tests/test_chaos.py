"""The chaos benchmark, bounded: one job on 4 simulated hosts (launch/host.sh agents,
2 workers each, launch/store.py as the rendezvous store), two faults from a fixed seed: a
host dying in the middle of a round's restore (after another was killed; both come back),
then a host holding a stage that hangs (SIGSTOP, then SIGCONT: it comes back on its own).
The host killed first is the first one started: with launch/store.py any host may die.
Then the job is stopped (distqat.status --stop). `python bench/chaos.py` runs all the kinds,
twenty faults, to the last outer step asked. Every process is ended by its
PID at teardown (the launcher's tag)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("bench_chaos", ROOT / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = chaos  # its dataclasses look their module up
_spec.loader.exec_module(chaos)


@pytest.mark.timeout(600)
def test_bounded_chaos_run_recovers_from_every_fault(launcher):
    kinds = ["restore", "hang"]
    # the hung host is noticed after comm.lost_after (10 s by default)
    result = chaos.run(launcher.cwd, kinds, seed=3, every=20, stop_after=True,
                       env=launcher.env(), extra=["comm.lost_after=4"], log=print)
    print(chaos.markdown(result, "tests/test_chaos.py"))
    assert [f["kind"] for f in result["faults"]] == kinds
    assert result["faults"][0]["hosts"][1] == 0  # the first host, killed for the restore
    for fault in result["faults"]:
        # recovered, and then the full fleet trained again
        assert fault["resumed_s"] is not None and fault["recovery_s"], fault
        assert fault["rejoin_s"] is not None and fault["join_recovery_s"], fault
        # nothing lost beyond the window in flight: the inner steps since the last outer
        # step, once per round the fault (or the hosts' return) ended
        rounds = len(fault["recovery_s"]) + len(fault["join_recovery_s"])
        assert fault["steps_lost"] + fault["join_steps_lost"] <= chaos.INNER_STEPS * rounds, fault
        assert all(fault["loss_equal"]), fault
    assert sum(len(f["loss_equal"]) for f in result["faults"]) >= 1, result
    hang = result["faults"][1]
    assert any("silent" in c or "has not answered" in c for c in hang["causes"]), hang
    # stopped after the last fault (distqat.status --stop): at the outer step agreed, past
    # the one reached when the stop was asked for
    assert result["exit_reason"] == "stopped"
    assert result["outer_steps_asked"] <= result["outer_steps_done"] <= result["outer_steps_asked"] + 60
    assert result["replicas"] == 2 and result["replicas_identical"], result
