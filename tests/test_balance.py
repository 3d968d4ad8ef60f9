"""Batch sizes that balance themselves: the split, its convergence on a real store, and a
job with one replica made three times slower."""

from datetime import timedelta

import pytest
import torch.distributed as dist

from distqat import faults
from distqat.balance import Balancer, advance, balanced_sizes
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
    assert advance({}, [48, 16], 10) == {0: 480, 1: 160}
    # a shard whose replica left keeps its position
    assert advance({0: 480, 1: 160, 2: 320}, [30, 34], 10) == {0: 780, 1: 500, 2: 320}


def _simulate(step_seconds, rebalances, per_replica=64, minimum=2):
    """Replicas whose inner step takes ``step_seconds[r](batch)``, balanced through a
    real TCPStore, as the drivers would: every one publishes, then every one reads."""
    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True,
                          timeout=timedelta(seconds=10))
    n = len(step_seconds)
    balancers = [Balancer(store, r, n, per_replica, minimum=minimum, every=1, timeout=10)
                 for r in range(n)]
    for outer in range(rebalances):
        for r, b in enumerate(balancers):
            size = b.sizes[r]
            b.record(size, step_seconds[r](size))
            b.publish(outer)
        results = [b.rebalance(outer) for b in balancers]
        assert all(sizes == results[0] for sizes in results)  # every driver agrees
        assert sum(results[0]) == n * per_replica  # the fleet's samples per step
    return results[0]


def test_a_replica_three_times_slower_gets_a_third_of_the_others_batch():
    sizes = _simulate([lambda b: 0.001 * b, lambda b: 0.003 * b], rebalances=3)
    assert sizes == [96, 32]
    sizes = _simulate([lambda b: 0.001 * b] * 2 + [lambda b: 0.003 * b], rebalances=3)
    assert sizes == [82, 82, 28]


def test_with_fixed_costs_per_step_the_times_converge():
    times = [lambda b: 0.010 + 0.001 * b, lambda b: 3 * (0.010 + 0.001 * b)]
    sizes = _simulate(times, rebalances=12)
    t0, t1 = (times[r](sizes[r]) for r in range(2))
    assert abs(t0 - t1) / t0 < 0.05, (sizes, t0, t1)
    assert sizes[1] < sizes[0] / 3  # the fixed cost is slowed too: less than a third


def test_slowdown_variable_is_parsed_and_checked():
    assert faults.slowdown_factors("1:3, 2:1.5") == {1: 3.0, 2: 1.5}
    assert faults.slowdown_factors("") == {}
    for bad in ("1", "x:2", "1:0.5"):
        with pytest.raises(ValueError, match=faults.SLOWDOWN_ENV):
            faults.slowdown_factors(bad)


BALANCED_RUN = ["world_size=2", "model_pipeline.num_stages=1", "diloco.balance=true",
                "diloco.inner_steps=5", "diloco.outer_steps=5",
                "diloco.batch_size_per_step=128", "model_pipeline.model_args.hidden=256",
                "comm.threads_per_worker=1", "eval_every=0", "log_every=1"]


@pytest.mark.timeout(240)
def test_a_slow_replica_gets_a_smaller_batch_and_positions_stay_exact(launcher, monkeypatch):
    monkeypatch.setenv(faults.SLOWDOWN_ENV, "1:3")
    code, out = launcher.run(*BALANCED_RUN)
    assert code == 0, failure_text(out)
    summary = launcher.summary()
    fast, slow = sorted(summary["replicas"], key=lambda r: r["replica"])
    # the fleet's samples are the configured ones; the slow replica processed fewer
    assert fast["samples"] + slow["samples"] == 2 * 128 * 5 * 5
    assert slow["samples"] < 0.8 * fast["samples"], (fast["samples"], slow["samples"])
    assert fast["stage_digests"] == slow["stage_digests"]  # weighted, still identical
    # the last checkpoint holds each replica's data position: exactly what it read
    last = sorted((launcher.cwd / "checkpoints").rglob("stage0-step00000005.pt"))[0]
    assert load_verified(last)["data_positions"] == {0: fast["samples"], 1: slow["samples"]}
