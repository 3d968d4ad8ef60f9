"""The resume decision of an elastic round (:mod:`distqat.elastic.restore`): the pure
``choose`` on every branch, and ``holdings`` on real checkpoint files."""

import logging
import random

import pytest
import torch

from distqat import checkpoint
from distqat.elastic.restore import Decision, RestoreError, choose, holdings
from distqat.plan import Member

LOGGER = "distqat.elastic.restore"


def members(*holds):
    """Members of ranks 0..n-1 on one host; ``holds[r]`` is rank r's (stage, step) pairs."""
    return [Member(rank=r, host="h", holds=tuple(h)) for r, h in enumerate(holds)]


def decide(ms, num_stages=2, *, restarted=False, mirror_enabled=True, allow_fresh=False):
    return choose(ms, num_stages, restarted=restarted, mirror_enabled=mirror_enabled,
                  allow_fresh=allow_fresh)


def warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


# ------------------------------------------------------------------ a consistent step


def test_newest_common_step_from_the_lowest_rank_holding_each_stage():
    ms = members(
        [(0, 1), (0, 2), (0, 3)],          # rank 0: stage 0 up to step 3
        [(0, 3), (0, 4)],                  # rank 1: stage 0 at 3 too (0 is lower), and 4
        [(1, 3)],                          # rank 2: stage 1 at 3
        [(1, 1), (1, 2)],                  # rank 3: stage 1 at 1 and 2
        [(1, 3), (1, 2)],                  # rank 4: stage 1 at 3 too (2 is lower)
    )
    # common steps: stage 0 {1,2,3,4} & stage 1 {1,2,3} = {1,2,3}: the newest is 3
    decision = decide(ms)
    assert decision == Decision(outer_step=3, sources={0: 0, 1: 2})
    assert not decision.fresh
    # the same decision whatever order the members were gathered in
    for seed in range(5):
        shuffled = list(ms)
        random.Random(seed).shuffle(shuffled)
        assert decide(shuffled) == decision


def test_lowest_rank_per_stage_at_the_chosen_step_not_at_other_steps():
    ms = members(
        [(0, 1), (1, 1)],                  # rank 0 holds both stages, but only step 1
        [(1, 2)],
        [(0, 2)],
        [(0, 2), (1, 2)],
    )
    assert decide(ms) == Decision(outer_step=2, sources={0: 2, 1: 1})


def test_a_consistent_step_wins_over_allow_fresh_and_over_mirroring_off():
    ms = members([(0, 5)], [(1, 5)])
    want = Decision(outer_step=5, sources={0: 0, 1: 1})
    assert decide(ms, allow_fresh=True) == want
    assert decide(ms, restarted=True, mirror_enabled=False) == want


def test_holdings_of_stages_beyond_the_plan_are_ignored():
    # num_stages is now 2: stage 2 checkpoints (an older 3-stage layout) play no part,
    # neither in the common step (stage 2 lacks step 4) nor as sources
    ms = members([(0, 4), (2, 7), (2, 9)], [(1, 4), (2, 4)], [(2, 1)])
    assert decide(ms) == Decision(outer_step=4, sources={0: 0, 1: 1})
    # and holding only such stages is holding nothing: a fresh start, no error
    only_beyond = members([(2, 3)], [(3, 3)])
    assert decide(only_beyond) == Decision(0, {})


# ------------------------------------------------------------------ the errors


def test_no_common_step_names_what_each_stage_holds():
    ms = members([(0, 1), (0, 3)], [(1, 2)], [])
    with pytest.raises(RestoreError) as err:
        decide(ms)
    msg = str(err.value)
    assert "no outer step is held for every stage" in msg
    assert "{0: [1, 3], 1: [2]}" in msg  # what is held, per stage
    assert "param_mirror.allow_fresh_start" in msg  # and the way out


def test_a_stage_held_nowhere_is_named():
    ms = members([(0, 1), (2, 1)], [(0, 2)], [(1, 1)])
    with pytest.raises(RestoreError) as err:
        decide(ms, num_stages=4)
    msg = str(err.value)
    assert "stage(s) [3] have no checkpoint" in msg  # stage 2 is held, stage 3 is not
    assert "param_mirror.allow_fresh_start" in msg


def test_restarted_with_mirroring_off_and_nothing_held_is_an_error():
    with pytest.raises(RestoreError, match="param_mirror.enable is false"):
        decide(members([], []), restarted=True, mirror_enabled=False)


# ------------------------------------------------------------------ fresh starts


@pytest.mark.parametrize("ms, restarted, mirror", [
    (members([(0, 1), (0, 3)], [(1, 2)]), False, True),   # no common step
    (members([(0, 1)], [(0, 1)]), False, True),           # stage 1 held nowhere
    (members([], []), True, False),                       # restarted, mirroring off
    (members([(0, 1)], [(1, 2)]), True, False),           # all of it at once
], ids=["no-common-step", "stage-held-nowhere", "restarted-mirror-off", "all"])
def test_allow_fresh_start_overrides_each_error_with_a_warning(caplog, ms, restarted, mirror):
    with pytest.raises(RestoreError):
        decide(ms, restarted=restarted, mirror_enabled=mirror)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        decision = decide(ms, restarted=restarted, mirror_enabled=mirror, allow_fresh=True)
    assert decision == Decision(0, {}) and decision.fresh
    logged = warnings(caplog)
    assert len(logged) == 1 and "allow_fresh_start" in logged[0], logged


def test_nothing_anywhere_on_a_first_round_is_a_quiet_fresh_start(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for allow in (False, True):
            decision = decide(members([], [], []), allow_fresh=allow)
            assert decision == Decision(outer_step=0, sources={}) and decision.fresh
    assert warnings(caplog) == []  # nothing was lost: no warning either


def test_restarted_before_the_first_outer_step_with_mirroring_on_starts_fresh(caplog):
    # the first outer step (the first checkpoint) was never reached: nothing to lose
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert decide(members([], []), restarted=True, mirror_enabled=True) == Decision(0, {})
    assert warnings(caplog) == []


# ------------------------------------------------------------------ holdings on disk


def _state(stage, step):
    return {"stage": stage, "step": step, "w": torch.full((3,), float(step))}


def test_holdings_lists_verified_checkpoints_of_every_folder(tmp_path):
    local, shared = tmp_path / "local", tmp_path / "shared"
    for folder, stage, step in [(local, 0, 1), (local, 0, 2), (local, 1, 2),
                                (shared, 1, 2), (shared, 1, 3), (shared, 2, 3)]:
        checkpoint.save(folder, stage, step, _state(stage, step), keep=5)
    # sorted, each pair once (stage 1 step 2 is in both folders), stage 2 beyond the plan
    assert holdings([local, shared], 2) == ((0, 1), (0, 2), (1, 2), (1, 3))
    assert holdings([local, shared], 3) == ((0, 1), (0, 2), (1, 2), (1, 3), (2, 3))
    assert holdings([tmp_path / "missing"], 2) == ()
    assert holdings([], 2) == ()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_holdings_skips_a_damaged_file_with_a_warning_naming_it(tmp_path, caplog, damage):
    local, shared = tmp_path / "local", tmp_path / "shared"
    good = checkpoint.save(local, 0, 1, _state(0, 1), keep=5)
    bad = checkpoint.save(local, 0, 2, _state(0, 2), keep=5)
    bad_here = checkpoint.save(local, 1, 2, _state(1, 2), keep=5)
    checkpoint.save(shared, 1, 2, _state(1, 2), keep=5)  # an intact copy elsewhere
    for path in (bad, bad_here):
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            data = data[:len(data) // 2]
        else:
            data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        held = holdings([local, shared], 2)
    # stage 0 step 2 is gone; stage 1 step 2 is still held through the shared copy
    assert held == ((0, 1), (1, 2))
    logged = warnings(caplog)
    assert len(logged) == 2, logged
    assert any(str(bad) in m for m in logged) and any(str(bad_here) in m for m in logged)
    assert not any(str(good) in m for m in logged)
    # what holdings reports is what choose decides on: with stage 0's step 2 damaged,
    # no step is whole any more, and the error says what is left
    with pytest.raises(RestoreError, match=r"\{0: \[1\], 1: \[2\]\}"):
        decide([Member(rank=0, host="h", holds=held)])
