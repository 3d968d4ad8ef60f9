"""Replicas that balance themselves (batch sizes or inner steps): the split, its
convergence on a real store, and jobs with one replica made three times slower."""

from datetime import timedelta

import pytest
import torch.distributed as dist

from distqat import faults
from distqat.balance import (Balancer, advance, balanced_sizes, equal_time_split, step_cost,
                             within_factor)
from distqat.checkpoint.format import load_verified
from distqat.elastic.dist import free_port

from conftest import failure_text


def test_sizes_follow_the_speeds_and_keep_the_total():
    assert balanced_sizes([1.0, 1.0], 128) == [64, 64]
    assert balanced_sizes([3.0, 1.0], 128) == [96, 32]
    assert balanced_sizes([1.0, 1.0, 1.0], 100) == [34, 33, 33]  # ties: lower replica
    sizes = balanced_sizes([5.0, 2.0, 0.7], 250)
    assert sum(sizes) == 250 and sizes[0] > sizes[1] > sizes[2]


def test_a_very_slow_replica_keeps_the_minimum():
    assert balanced_sizes([100.0, 1.0, 1.0], 64, minimum=4) == [56, 4, 4]
    assert balanced_sizes([100.0, 0.001], 10, minimum=1) == [9, 1]


def test_impossible_splits_are_refused():
    with pytest.raises(ValueError, match="cannot split 5 samples over 3"):
        balanced_sizes([1.0, 1.0, 1.0], 5, minimum=2)
    with pytest.raises(ValueError, match="speeds must be > 0"):
        balanced_sizes([1.0, 0.0], 10)


def test_positions_advance_by_each_replicas_own_samples():
    assert advance({}, [480, 160]) == {0: 480, 1: 160}
    # a shard whose replica left keeps its position
    assert advance({0: 480, 1: 160, 2: 320}, [300, 340]) == {0: 780, 1: 500, 2: 320}


def _simulate(step_seconds, rebalances, per_replica=64, minimum=2, mode="batch",
              inner_steps=10, tolerance=0.0):
    """Replicas whose inner step takes ``step_seconds[r](batch)``, balanced through a
    real TCPStore, as the drivers would: every one runs its window, publishes, then every
    one reads. Returns the last window's batch sizes and inner steps."""
    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True,
                          timeout=timedelta(seconds=10))
    n = len(step_seconds)
    balancers = [Balancer(store, r, n, per_replica, minimum=minimum, every=1, timeout=10,
                          mode=mode, inner_steps=inner_steps, tolerance=tolerance)
                 for r in range(n)]
    for outer in range(rebalances):
        for r, b in enumerate(balancers):
            for _ in range(b.steps[r]):
                b.record(b.sizes[r], step_seconds[r](b.sizes[r]))
            b.publish(outer)
        for b in balancers:
            b.rebalance(outer)
        windows = [(b.sizes, b.steps) for b in balancers]
        assert all(w == windows[0] for w in windows)  # every driver agrees
        # the fleet's samples per window are the config's
        assert sum(balancers[0].window_samples()) == n * per_replica * inner_steps
    return windows[0]


def test_a_replica_three_times_slower_gets_a_third_of_the_others_batch():
    sizes, steps = _simulate([lambda b: 0.001 * b, lambda b: 0.003 * b], rebalances=3)
    assert (sizes, steps) == ([96, 32], [10, 10])
    sizes, _ = _simulate([lambda b: 0.001 * b] * 2 + [lambda b: 0.003 * b], rebalances=3)
    assert sizes == [82, 82, 28]


def test_balancing_inner_steps_gives_a_replica_three_times_slower_a_third_of_the_steps():
    # fixed costs per step do not matter here: every step keeps its batch
    times = [lambda b: 0.010 + 0.001 * b, lambda b: 3 * (0.010 + 0.001 * b)]
    sizes, steps = _simulate(times, rebalances=1, mode="steps", inner_steps=10)
    assert (sizes, steps) == ([64, 64], [15, 5])
    sizes, steps = _simulate(times[:1] * 2 + times[1:], rebalances=2, mode="steps",
                             inner_steps=10)
    assert (sizes, steps) == ([64, 64, 64], [13, 13, 4])
    # however slow, a replica keeps one step per window: its shard and its vote
    sizes, steps = _simulate([lambda b: 0.001, lambda b: 1.0], rebalances=1, mode="steps",
                             inner_steps=4)
    assert steps == [7, 1]


def test_without_balancing_the_window_is_the_configs():
    fixed = Balancer.fixed(1, 3, 64, inner_steps=10)
    fixed.record(64, 1.0)
    fixed.publish(0)  # no store: nothing is posted, nothing is read
    fixed.rebalance(0)
    assert (fixed.sizes, fixed.steps, fixed.window_samples()) == ([64] * 3, [10] * 3,
                                                                   [640] * 3)


def test_with_fixed_costs_per_step_the_second_rebalance_equalises_the_step_times():
    times = [lambda b: 0.010 + 0.001 * b, lambda b: 3 * (0.010 + 0.001 * b)]
    first, _ = _simulate(times, rebalances=1)
    assert first == [96, 32]  # one window measured: in proportion to the speeds
    sizes, _ = _simulate(times, rebalances=2)  # two sizes measured: the fitted lines
    t0, t1 = (times[r](sizes[r]) for r in range(2))
    assert abs(t0 - t1) < 0.003 * 1.001, (sizes, t0, t1)  # equal to one sample's time
    assert sizes[1] < sizes[0] / 3  # the fixed cost is slowed too: less than a third
    assert _simulate(times, rebalances=6)[0] == sizes  # and there it stays


def test_windows_within_the_tolerance_keep_their_split():
    times = [lambda b: 0.001 * b, lambda b: 1.05 * 0.001 * b]  # 5 % slower
    assert _simulate(times, rebalances=3, tolerance=0.1)[0] == [64, 64]
    assert _simulate(times, rebalances=3, tolerance=0.0)[0] == [66, 62]


def test_the_step_cost_line_and_its_fallbacks():
    assert step_cost([(64, 0.074)]) == (0.0, 64 / 0.074)  # one size: all per sample
    fixed, rate = step_cost([(64, 0.074), (96, 0.106)])
    assert fixed == pytest.approx(0.010) and rate == pytest.approx(1000.0)
    # the older point at a size within 10 % is skipped for the one before it
    fixed, rate = step_cost([(64, 0.074), (96, 0.106), (100, 0.110)])
    assert fixed == pytest.approx(0.010) and rate == pytest.approx(1000.0)
    # noise that makes the line fall: all per sample again
    assert step_cost([(64, 0.080), (96, 0.070)]) == (0.0, 96 / 0.070)
    # T = (128 + 0.010 * 1000 + 0.030 * 1000/3) / (4000/3) = 0.111 s: 101 and 27 samples
    assert equal_time_split([(0.010, 1000.0), (0.030, 1000.0 / 3)], 128) == [101, 27]


def test_a_rebalance_changes_no_batch_by_more_than_the_factor():
    assert within_factor([512, 512], [1014, 10], 2.0) == [768, 256]  # cut short, same sum
    assert within_factor([300, 100, 100], [400, 50, 50], 2.0) == [400, 50, 50]  # in reach


def test_slowdown_variable_is_parsed_and_checked():
    assert faults.slowdown_factors("1:3, 2:1.5") == {1: 3.0, 2: 1.5}
    assert faults.slowdown_factors("") == {}
    for bad in ("1", "x:2", "1:0.5"):
        with pytest.raises(ValueError, match=faults.SLOWDOWN_ENV):
            faults.slowdown_factors(bad)


BALANCED_RUN = ["world_size=2", "model_pipeline.num_stages=1", "diloco.inner_steps=5",
                "diloco.outer_steps=5", "diloco.batch_size_per_step=128",
                "model_pipeline.model_args.hidden=256", "comm.threads_per_worker=1",
                "eval_every=0", "log_every=1"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["batch", "steps"])
def test_a_slow_replica_gets_less_work_and_positions_stay_exact(launcher, monkeypatch, mode):
    monkeypatch.setenv(faults.SLOWDOWN_ENV, "1:3")
    code, out = launcher.run(*BALANCED_RUN, f"diloco.balance={mode}")
    assert code == 0, failure_text(out)
    summary = launcher.summary()
    fast, slow = sorted(summary["replicas"], key=lambda r: r["replica"])
    # the fleet's samples are the configured ones; the slow replica processed fewer
    assert fast["samples"] + slow["samples"] == 2 * 128 * 5 * 5
    assert slow["samples"] < 0.8 * fast["samples"], (fast["samples"], slow["samples"])
    if mode == "steps":  # every step at the config's batch; the slow replica took fewer
        assert fast["samples"] % 128 == 0 and slow["samples"] % 128 == 0
        logs = "".join(log.read_text() for log in launcher.cwd.rglob("rank*.log"))
        assert "-> inner steps [" in logs  # the rebalance is logged
    # reports count the job's inner steps, whatever each replica took
    assert fast["inner_steps_done"] == slow["inner_steps_done"] == 5 * 5
    assert fast["stage_digests"] == slow["stage_digests"]  # weighted, still identical
    # the last checkpoint holds each replica's data position: exactly what it read
    last = sorted((launcher.cwd / "checkpoints").rglob("stage0-step00000005.pt"))[0]
    assert load_verified(last)["data_positions"] == {0: fast["samples"], 1: slow["samples"]}
