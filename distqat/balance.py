"""Batch sizes that balance themselves (``diloco.balance``).

Replicas of unequal speed reach the outer step at unequal times, and the fast ones wait
for the slowest. With ``diloco.balance`` every replica measures its speed (samples per
second of its inner steps since the last rebalance, waiting for its data included) and,
every ``diloco.balance_every`` outer steps, all drivers split the fleet's samples per inner
step, ``num_replicas * batch_size_per_step``, in proportion to those speeds:

    b_r = total * s_r / sum_s s_s     (rounded by largest remainder, each >= minimum)

so that every replica's window of ``inner_steps`` takes about the same time, and the
fleet's samples per outer step stay what the config says. A step's time is not exactly
proportional to its batch (fixed costs per step), so the split is refined at every
rebalance from speeds measured at the current sizes. The outer step then weights each
replica's pseudo-gradient by the samples it processed (:mod:`distqat.diloco`), and each
replica's data position advances by its own samples (sample offsets, not step counts).

A round starts from equal sizes: its fleet may differ from the last round's, so older
speeds say little. Speeds travel through the round's store under the outer step's number;
every driver reads the same numbers and computes the same sizes.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Dict, List, Sequence

log = logging.getLogger(__name__)

KEY = "distqat/balance/outer{outer}/replica{replica}"


def balanced_sizes(speeds: Sequence[float], total: int, minimum: int = 1) -> List[int]:
    """``total`` samples split in proportion to ``speeds``, each at least ``minimum``,
    summing to ``total`` exactly (largest remainder; ties go to the lower replica).
    Equal speeds give equal sizes whenever ``total`` divides evenly."""
    n = len(speeds)
    if n == 0 or total < n * minimum:
        raise ValueError(f"cannot split {total} samples over {n} replicas with at least "
                         f"{minimum} each")
    if any(s <= 0 for s in speeds):
        raise ValueError(f"speeds must be > 0, got {list(speeds)}")
    fixed: Dict[int, int] = {}
    while True:  # replicas whose share falls below the minimum get the minimum
        free = [r for r in range(n) if r not in fixed]
        room = total - sum(fixed.values())
        weight = sum(speeds[r] for r in free)
        ideal = {r: room * speeds[r] / weight for r in free}
        low = [r for r in free if ideal[r] < minimum]
        if not low:
            break
        fixed.update({r: minimum for r in low})
    sizes = dict(fixed)
    sizes.update({r: int(ideal[r]) for r in free})
    left = total - sum(sizes.values())
    by_remainder = sorted(free, key=lambda r: (-(ideal[r] - int(ideal[r])), r))
    for r in by_remainder[:left]:
        sizes[r] += 1
    return [sizes[r] for r in range(n)]


class Balancer:
    """One driver's side of the balancing: ``sizes`` is every replica's batch size for
    the current window (identical on every driver). :meth:`publish` posts this replica's
    speed before the outer step; :meth:`rebalance` (after it) reads every replica's and
    sets the next sizes."""

    def __init__(self, store, replica: int, num_replicas: int, per_replica: int, *,
                 minimum: int, every: int, timeout: float):
        self.store = store
        self.replica = replica
        self.num_replicas = num_replicas
        self.total = per_replica * num_replicas
        self.minimum = minimum
        self.every = every
        self.timeout = timeout
        self.sizes = [per_replica] * num_replicas
        self.samples = 0
        self.seconds = 0.0

    def record(self, samples: int, seconds: float) -> None:
        """One inner step of this replica: ``samples`` in ``seconds``."""
        self.samples += samples
        self.seconds += seconds

    def due(self, outer: int) -> bool:
        """Is the end of outer step ``outer`` (0-based) a rebalance?"""
        return (outer + 1) % self.every == 0

    def publish(self, outer: int) -> None:
        if self.due(outer):
            speed = self.samples / max(self.seconds, 1e-9)
            self.store.set(KEY.format(outer=outer, replica=self.replica), repr(speed))

    def rebalance(self, outer: int) -> List[int]:
        """The sizes for the windows after outer step ``outer``."""
        if not self.due(outer):
            return self.sizes
        keys = [KEY.format(outer=outer, replica=r) for r in range(self.num_replicas)]
        self.store.wait(keys, timedelta(seconds=self.timeout))
        speeds = [float(self.store.get(k).decode()) for k in keys]
        sizes = balanced_sizes(speeds, self.total, self.minimum)
        if sizes != self.sizes:
            log.info("rebalanced after outer step %d: speeds %s samples/s -> batch sizes %s",
                     outer + 1, " ".join(f"{s:.1f}" for s in speeds), sizes)
        self.sizes = sizes
        self.samples, self.seconds = 0, 0.0
        return sizes


def advance(positions: Dict[int, int], sizes: Sequence[int], inner_steps: int) -> Dict[int, int]:
    """Every replica's data position after one window at ``sizes``; shards not in this
    round (a replica that left) keep theirs."""
    moved = dict(positions)
    for replica, size in enumerate(sizes):
        moved[replica] = moved.get(replica, 0) + size * inner_steps
    return moved
