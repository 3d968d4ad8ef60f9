"""The job's history across rounds (:mod:`distqat.elastic.history`) in a real run folder:
stop events, ``fleet.json``, recoveries and the pairing of losses before and after them."""

import json
import time

import pytest

from distqat.elastic import history
from distqat.elastic.history import (FLEET_FILE, MATCH_TRIES, FleetKeeper, record_stop,
                                     stops_since)
from distqat.monitor.summary import ReplicaReport

INNER_STEPS = 3


def on_disk(run):
    """``fleet.json`` as a reader sees it: complete, valid JSON, no temp file beside it."""
    assert not list(run.glob(f".{FLEET_FILE}*")), "a temp file was left behind"
    return json.loads((run / FLEET_FILE).read_text())


def check_saved(keeper):
    assert on_disk(keeper.run_path) == json.loads(json.dumps(keeper.fleet))


def start_round(run, *, fresh_job, resumed_from, world_size=4, num_replicas=2):
    keeper = FleetKeeper(run, fresh_job=fresh_job)
    keeper.round_started(world_size=world_size, num_replicas=num_replicas,
                         resumed_from=resumed_from, inner_steps=INNER_STEPS)
    check_saved(keeper)
    return keeper


def never_called():
    pytest.fail("reports() was read although no recovery awaits its losses")


# ------------------------------------------------------------------ the small records


def test_load_save_and_a_new_history(tmp_path):
    assert history.load(tmp_path) == history.new()  # no fleet.json yet
    assert history.new() == {"rounds": [], "recoveries": [], "restarts": 0, "loss_first": None}
    fleet = dict(history.new(), restarts=2, loss_first=1.5)
    history.save(tmp_path, fleet)
    assert history.load(tmp_path) == fleet == on_disk(tmp_path)
    (tmp_path / FLEET_FILE).write_text("{half a fi")  # unreadable: as if none
    assert history.load(tmp_path) == history.new()


def test_record_stop_and_stops_since(tmp_path):
    assert stops_since(tmp_path, 0.0) == []  # no events folder yet
    record_stop(tmp_path, 3, "error: boom", replica=1, inner_step=7,
                loss_after_outer={2: 1.25, 1: 1.5})
    cut = time.time()
    time.sleep(0.01)
    record_stop(tmp_path, 1, "stopped")  # not a driver: no step, no losses
    (tmp_path / "events" / "stop-9-rank9.json").write_text("not json")  # unreadable: skipped
    everything = stops_since(tmp_path, 0.0)
    assert [e["rank"] for e in everything] == [3, 1]  # in time order
    first = everything[0]
    assert first["reason"] == "error: boom" and first["replica"] == 1
    assert first["inner_step"] == 7
    assert first["loss_after_outer"] == {"1": 1.5, "2": 1.25}  # JSON keys are strings
    assert everything[1]["replica"] is None and everything[1]["inner_step"] is None
    assert everything[1]["loss_after_outer"] == {}
    assert [e["rank"] for e in stops_since(tmp_path, cut)] == [1]


# ------------------------------------------------------------------ rounds and recoveries


def test_first_round_of_a_fresh_job_sets_loss_first(tmp_path):
    keeper = start_round(tmp_path, fresh_job=True, resumed_from=0)
    fleet = on_disk(tmp_path)
    assert fleet["restarts"] == 0 and fleet["recoveries"] == [] and fleet["loss_first"] is None
    [round0] = fleet["rounds"]
    assert round0["world_size"] == 4 and round0["num_replicas"] == 2
    assert round0["resumed_from_outer_step"] == 0
    assert keeper.first_step(2.5) is None  # nothing to recover from
    assert on_disk(tmp_path)["loss_first"] == 2.5
    keeper.outer_step(2.25, never_called)
    assert on_disk(tmp_path)["loss_last"] == 2.25
    keeper.outer_step(2.0, never_called)
    assert on_disk(tmp_path)["loss_last"] == 2.0 and on_disk(tmp_path)["loss_first"] == 2.5
    # TensorBoard scalars of the fleet (world size, pipelines, restarts per round)
    assert list((tmp_path / "fleet").glob("events.out.tfevents.*"))


def test_a_fresh_job_forgets_an_older_history_in_the_same_folder(tmp_path):
    history.save(tmp_path, dict(history.new(), restarts=4, loss_first=9.0,
                                rounds=[{"started": 1.0}]))
    keeper = start_round(tmp_path, fresh_job=True, resumed_from=0)
    assert keeper.fleet["restarts"] == 0 and len(keeper.fleet["rounds"]) == 1
    keeper.first_step(3.0)
    assert on_disk(tmp_path)["loss_first"] == 3.0


def _failed_first_round(run):
    """Round 1 trains, then replica 1's driver fails; every worker records its stop."""
    # an event of an earlier job in this folder, before round 1: must not count
    record_stop(run, 0, "old", replica=0, inner_step=100, loss_after_outer={2: 9.0})
    time.sleep(0.01)
    keeper = start_round(run, fresh_job=True, resumed_from=0)
    keeper.first_step(2.5)
    keeper.outer_step(2.0, never_called)
    time.sleep(0.01)
    first_stop = time.time()
    record_stop(run, 2, "error: replica 1 died", replica=1, inner_step=8,
                loss_after_outer={1: 1.8, 2: 1.6})
    record_stop(run, 0, "stopped", replica=0, inner_step=7, loss_after_outer={1: 1.9, 2: 1.7})
    record_stop(run, 1, "stopped")  # a stage 1 host: no inner step
    record_stop(run, 3, "stopped", replica=2, inner_step=6, loss_after_outer={1: 1.95})
    return first_stop


def test_second_round_turns_the_stops_into_a_recovery(tmp_path):
    first_stop = _failed_first_round(tmp_path)
    noticed = min(e["time"] for e in stops_since(tmp_path, first_stop - 1e-3))
    time.sleep(0.3)  # the rebuild: the recovery's seconds count it
    keeper = start_round(tmp_path, fresh_job=False, resumed_from=2, world_size=3,
                         num_replicas=1)
    fleet = on_disk(tmp_path)
    assert fleet["restarts"] == 1 and len(fleet["rounds"]) == 2
    assert fleet["rounds"][1]["world_size"] == 3
    assert fleet["rounds"][1]["resumed_from_outer_step"] == 2
    # each old replica's loss on the resumed step's batch (replica 2 had none at step 2)
    assert keeper.before == {0: 1.7, 1: 1.6}
    before_step = time.time()
    recovery = keeper.first_step(1.65)
    after_step = time.time()
    assert recovery is not None
    # the furthest step reached (8, the old event's 100 is ignored) minus the resumed one
    assert recovery["steps_lost"] == 8 - 2 * INNER_STEPS
    assert recovery["resumed_from_outer_step"] == 2
    assert recovery["noticed_at"] == noticed
    # from the first stop's notice (>= 0.3 s ago), not from the round's start
    assert before_step - noticed <= recovery["seconds"] <= after_step - noticed
    assert recovery["seconds"] >= 0.3
    fleet = on_disk(tmp_path)
    assert fleet["recoveries"] == [recovery]
    assert fleet["loss_first"] == 2.5  # still the job's first loss, not the new round's
    assert recovery["loss_before"] is None and recovery["loss_after"] is None
    assert list((tmp_path / "fleet").glob("events.out.tfevents.*"))


def test_a_restart_without_stop_events_counts_from_the_round_start(tmp_path):
    keeper = start_round(tmp_path, fresh_job=True, resumed_from=0)
    keeper.first_step(2.0)
    keeper = start_round(tmp_path, fresh_job=False, resumed_from=0)
    started = keeper.fleet["rounds"][-1]["started"]
    time.sleep(0.05)
    recovery = keeper.first_step(2.0)
    assert recovery["noticed_at"] is None and recovery["steps_lost"] == 0
    assert 0.05 <= recovery["seconds"] <= time.time() - started
    keeper = start_round(tmp_path, fresh_job=False, resumed_from=0)
    keeper.first_step(2.0)
    fleet = on_disk(tmp_path)
    assert fleet["restarts"] == 2 and len(fleet["recoveries"]) == 2 and len(fleet["rounds"]) == 3


# ------------------------------------------------------------------ pairing the losses


def _recovered(run):
    _failed_first_round(run)
    keeper = start_round(run, fresh_job=False, resumed_from=2)
    assert keeper.first_step(1.65) is not None
    return keeper


def report(replica, **after):
    return ReplicaReport(replica=replica, losses=[1.0],
                         loss_after_outer={int(k[1:]): v for k, v in after.items()})


def test_match_pairs_the_lowest_replica_present_in_both_rounds(tmp_path):
    keeper = _recovered(tmp_path)
    calls = []

    def reports():
        calls.append(1)
        # replica 0 has not reached the resumed step's batch yet; replica 2 was not in
        # the old round's losses at step 2; replica 1 is the lowest with both
        return {0: report(0, s3=1.5), 1: report(1, s2=1.61), 2: report(2, s2=1.0)}

    keeper.outer_step(1.55, reports)
    assert len(calls) == 1 and keeper.unmatched is None
    [recovery] = on_disk(tmp_path)["recoveries"]
    assert (recovery["loss_replica"], recovery["loss_before"], recovery["loss_after"]) \
        == (1, 1.6, 1.61)
    assert on_disk(tmp_path)["loss_last"] == 1.55
    keeper.outer_step(1.5, never_called)  # paired: the reports are not read again
    assert on_disk(tmp_path)["loss_last"] == 1.5


def test_match_prefers_replica_0_when_both_have_it(tmp_path):
    keeper = _recovered(tmp_path)
    keeper.match_losses({1: report(1, s2=1.61), 0: report(0, s2=1.7)})
    [recovery] = on_disk(tmp_path)["recoveries"]
    assert (recovery["loss_replica"], recovery["loss_before"], recovery["loss_after"]) \
        == (0, 1.7, 1.7)


def test_match_waits_for_a_later_report_then_gives_up_after_match_tries(tmp_path):
    keeper = _recovered(tmp_path)
    for _ in range(MATCH_TRIES - 1):  # nobody has published the resumed step yet
        keeper.outer_step(1.6, lambda: {0: report(0), 5: report(5, s2=1.0)})
        assert keeper.unmatched is not None
    keeper.outer_step(1.6, lambda: {1: report(1, s2=1.62)})  # the last try finds it
    assert on_disk(tmp_path)["recoveries"][0]["loss_after"] == 1.62

    keeper = _recovered(tmp_path / "other")
    for _ in range(MATCH_TRIES):
        keeper.outer_step(1.6, lambda: {0: report(0)})
    assert keeper.unmatched is None  # given up
    keeper.outer_step(1.6, never_called)
    keeper.match_losses({0: report(0, s2=1.7)})  # too late: nothing changes
    recovery = on_disk(tmp_path / "other")["recoveries"][0]
    assert recovery["loss_replica"] is None and recovery["loss_before"] is None
    assert recovery["loss_after"] is None


def test_without_a_pair_the_loss_after_is_recorded_alone(tmp_path):
    # the failure came right at an outer step: no survivor had reached the resumed batch
    record_stop(tmp_path, 0, "stopped")
    keeper = start_round(tmp_path, fresh_job=True, resumed_from=0)
    keeper.first_step(2.5)
    record_stop(tmp_path, 2, "error: a host died", replica=1, inner_step=2 * INNER_STEPS,
                loss_after_outer={1: 1.8})
    keeper = start_round(tmp_path, fresh_job=False, resumed_from=2)
    assert keeper.before == {}
    keeper.first_step(1.65)
    keeper.outer_step(1.6, lambda: {1: report(1, s2=1.62), 0: report(0, s2=1.7)})
    assert keeper.unmatched is None  # nothing to wait for
    [recovery] = on_disk(tmp_path)["recoveries"]
    assert recovery["steps_lost"] == 0
    assert (recovery["loss_replica"], recovery["loss_before"], recovery["loss_after"]) \
        == (0, None, 1.7)


def test_an_unpaired_loss_after_is_recorded_once_the_tries_are_spent(tmp_path):
    keeper = _recovered(tmp_path)  # replicas 0 and 1 had losses before
    for _ in range(MATCH_TRIES - 1):
        keeper.outer_step(1.6, lambda: {2: report(2, s2=1.4)})
        assert keeper.unmatched is not None  # replica 0 or 1 may still publish
    keeper.outer_step(1.6, lambda: {2: report(2, s2=1.4)})
    assert keeper.unmatched is None
    [recovery] = on_disk(tmp_path)["recoveries"]
    assert (recovery["loss_replica"], recovery["loss_before"], recovery["loss_after"]) \
        == (2, None, 1.4)
