"""Replicas of unequal speed that reach the outer step together (``diloco.balance``).

Replicas of unequal speed reach the outer step at unequal times, and the fast ones wait
for the slowest. With ``diloco.balance`` every replica measures its speed (samples per
second of its inner steps since the last rebalance, waiting for its data included) and,
every ``diloco.balance_every`` outer steps, all drivers split the fleet's work of one
window in proportion to those speeds, in one of two ways:

* ``batch``: the samples per inner step, ``num_replicas * batch_size_per_step``; every
  replica takes ``inner_steps`` steps at its own batch size ``b_r``;
* ``steps``: the inner steps of the window, ``num_replicas * inner_steps``; every replica
  keeps ``batch_size_per_step`` and takes its own number of steps ``H_r`` (Forgather's
  dynamic local updates): a fast replica's pseudo-gradient holds more optimizer steps,
  not a larger batch. The batch shapes never change.

so that every replica's window takes about the same time, and the fleet's samples per
outer step stay what the config says. Inner steps are split in proportion to the speeds
(a window's time is its number of steps times a step's). A step's time is not
proportional to its batch, though: it has fixed costs (the optimizer step, the RPCs), and
a slowed host slows them too. So batch sizes are split for equal step times under
``t_r(b) = c_r + b / v_r`` (:func:`equal_time_split`), the line fitted through the
replica's last two windows at different sizes (:func:`step_cost`; proportional to the
speed until there are two). The first rebalance moves in proportion to the speeds, the
second lands on the fit, and from then on the split stays while the replicas' windows
take within ``diloco.balance_tolerance`` of each other (default 10 %): each change
restarts the replica's data loader (and on a GPU, new shapes re-tune kernels), and
splitting in proportion to the speeds alone drifted towards the fixed point for 8 windows
(BENCHMARKS.md). A rebalance changes no batch size by more than a factor of 2
(:data:`MAX_CHANGE`): two noisy windows can make a steep line. The outer step then
weights each replica's pseudo-gradient by the samples it processed, ``b_r * H_r``
(:mod:`distqat.diloco`), and each replica's data position advances by those samples
(sample offsets, not step counts).

A round starts from equal sizes: its fleet may differ from the last round's, so older
speeds say little. Speeds travel through the round's store under the outer step's number;
every driver reads the same numbers and computes the same sizes.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Dict, List, Sequence, Tuple

log = logging.getLogger(__name__)

KEY = "distqat/balance/outer{outer}/replica{replica}"
MAX_CHANGE = 2.0  # a rebalance changes a replica's batch size by at most this factor


def balanced_sizes(speeds: Sequence[float], total: int, minimum: int = 1) -> List[int]:
    """``total`` samples split in proportion to ``speeds``, each at least ``minimum``,
    summing to ``total`` exactly (largest remainder; ties go to the lower replica).
    Equal speeds give equal sizes whenever ``total`` divides evenly."""
    return equal_time_split([(0.0, s) for s in speeds], total, minimum)


def equal_time_split(costs: Sequence[Tuple[float, float]], total: int,
                     minimum: int = 1) -> List[int]:
    """``total`` split so that every replica's step takes the same time ``T``, replica r's
    step taking ``c_r + b_r / v_r`` for ``costs[r] = (c_r, v_r)`` (a fixed cost in seconds
    and a rate in samples/s)::

        b_r = (T - c_r) v_r,   sum_r b_r = total  =>  T = (total + sum_r c_r v_r) / sum_r v_r

    Each ``b_r`` at least ``minimum`` (those below are fixed there and ``T`` solved for
    the rest), rounded by largest remainder (ties to the lower replica). With no fixed
    costs this is the split in proportion to the rates."""
    n = len(costs)
    if n == 0 or total < n * minimum:
        raise ValueError(f"cannot split {total} samples over {n} replicas with at least "
                         f"{minimum} each")
    if any(v <= 0 or c < 0 for c, v in costs):
        raise ValueError(f"speeds must be > 0 (and fixed costs >= 0), got {list(costs)}")
    fixed: Dict[int, int] = {}
    while True:  # replicas whose share falls below the minimum get the minimum
        free = [r for r in range(n) if r not in fixed]
        room = total - sum(fixed.values())
        rate = sum(costs[r][1] for r in free)
        step_s = (room + sum(costs[r][0] * costs[r][1] for r in free)) / rate
        ideal = {r: (step_s - costs[r][0]) * costs[r][1] for r in free}
        low = [r for r in free if ideal[r] < minimum]
        if not low:
            break
        fixed.update({r: minimum for r in low})
    return largest_remainder([fixed[r] if r in fixed else ideal[r] for r in range(n)])


def largest_remainder(ideal: Sequence[float]) -> List[int]:
    """Integers summing to ``round(sum(ideal))``: each ideal share rounded down, the rest
    one by one to the largest remainders (ties to the lower replica)."""
    sizes = [int(x) for x in ideal]
    left = round(sum(ideal)) - sum(sizes)
    by_remainder = sorted(range(len(ideal)), key=lambda r: (-(ideal[r] - sizes[r]), r))
    for r in by_remainder[:left]:
        sizes[r] += 1
    return sizes


def within_factor(have: Sequence[int], want: Sequence[int], factor: float) -> List[int]:
    """The way from split ``have`` to ``want`` (same sum), cut short where a replica's
    size would change by more than ``factor``: a fit through two noisy windows is
    trusted that far per rebalance."""
    step = 1.0
    for old, new in zip(have, want):
        if new > old * factor:
            step = min(step, (old * factor - old) / (new - old))
        elif new < old / factor:
            step = min(step, (old - old / factor) / (old - new))
    return largest_remainder([old + step * (new - old) for old, new in zip(have, want)])


def step_cost(points: Sequence[Tuple[int, float]]) -> Tuple[float, float]:
    """A replica's step time as ``(fixed seconds, samples/s)`` from its measured
    ``(batch size, seconds per step)`` windows, latest last: the line through the latest
    and the last one at a batch at least 10 % away. With one batch size only, or a line
    that noise made fall or cross below zero, all of the time is taken as per sample."""
    batch, seconds = points[-1]
    for old_batch, old_seconds in reversed(points[:-1]):
        if abs(old_batch - batch) >= 0.1 * max(old_batch, batch):
            per_sample = (seconds - old_seconds) / (batch - old_batch)
            fixed = seconds - per_sample * batch
            if per_sample > 0 and fixed >= 0:
                return fixed, 1.0 / per_sample
            break
    return 0.0, batch / seconds


class Balancer:
    """One driver's side of the balancing: ``sizes`` (every replica's batch size) and
    ``steps`` (every replica's inner steps) for the current window, identical on every
    driver. :meth:`publish` posts this replica's speed before the outer step;
    :meth:`rebalance` (after it) reads every replica's and sets the next window."""

    def __init__(self, store, replica: int, num_replicas: int, per_replica: int, *,
                 minimum: int, every: int, timeout: float, mode: str = "batch",
                 inner_steps: int = 1, tolerance: float = 0.0):
        if mode not in ("batch", "steps"):
            raise ValueError(f"balance mode: expected batch or steps, got {mode!r}")
        self.store = store
        self.replica = replica
        self.num_replicas = num_replicas
        self.mode = mode
        # what is split: the samples of one inner step, or the inner steps of a window
        self.total = (per_replica if mode == "batch" else inner_steps) * num_replicas
        self.minimum = minimum if mode == "batch" else 1
        self.every = every
        self.tolerance = tolerance
        self.timeout = timeout
        self.sizes = [per_replica] * num_replicas
        self.steps = [inner_steps] * num_replicas
        # every replica's measured windows: (batch size, seconds per step), latest last
        self.points: Dict[int, List[Tuple[int, float]]] = {r: [] for r in range(num_replicas)}
        self.samples = 0
        self.seconds = 0.0

    @classmethod
    def fixed(cls, replica: int, num_replicas: int, per_replica: int,
              inner_steps: int) -> "Balancer":
        """The window without balancing: every replica ``inner_steps`` steps of
        ``per_replica`` samples, never changed."""
        return cls(None, replica, num_replicas, per_replica, minimum=1, every=0,
                   timeout=0.0, inner_steps=inner_steps)

    def record(self, samples: int, seconds: float) -> None:
        """One inner step of this replica: ``samples`` in ``seconds``."""
        self.samples += samples
        self.seconds += seconds

    def due(self, outer: int) -> bool:
        """Is the end of outer step ``outer`` (0-based) a rebalance? (Never for
        ``every == 0``: :meth:`fixed`.)"""
        return self.every > 0 and (outer + 1) % self.every == 0

    def publish(self, outer: int) -> None:
        if self.due(outer):
            speed = self.samples / max(self.seconds, 1e-9)
            self.store.set(KEY.format(outer=outer, replica=self.replica), repr(speed))

    def rebalance(self, outer: int) -> None:
        """Set ``sizes`` and ``steps`` for the windows after outer step ``outer``."""
        if not self.due(outer):
            return
        keys = [KEY.format(outer=outer, replica=r) for r in range(self.num_replicas)]
        self.store.wait(keys, timedelta(seconds=self.timeout))
        speeds = [float(self.store.get(k).decode()) for k in keys]
        self.samples, self.seconds = 0, 0.0
        # every replica's window at the current split, at the speeds just measured
        window_s = [n / s for n, s in zip(self.window_samples(), speeds)]
        for r, speed in enumerate(speeds):
            self.points[r] = self.points[r][-7:] + [(self.sizes[r], self.sizes[r] / speed)]
        if max(window_s) <= (1 + self.tolerance) * min(window_s):
            return  # close enough: keep the split (module docstring)
        if self.mode == "batch":
            fitted = equal_time_split([step_cost(self.points[r]) for r in range(len(speeds))],
                                      self.total, self.minimum)
            split = within_factor(self.sizes, fitted, MAX_CHANGE)
        else:
            split = balanced_sizes(speeds, self.total, self.minimum)
        have = self.sizes if self.mode == "batch" else self.steps
        if split != have:
            log.info("rebalanced after outer step %d: speeds %s samples/s -> %s %s",
                     outer + 1, " ".join(f"{s:.1f}" for s in speeds),
                     "batch sizes" if self.mode == "batch" else "inner steps", split)
        if self.mode == "batch":
            self.sizes = split
        else:
            self.steps = split

    def window_samples(self) -> List[int]:
        """Every replica's samples in the current window: the outer step's weights."""
        return [b * h for b, h in zip(self.sizes, self.steps)]


def advance(positions: Dict[int, int], window_samples: Sequence[int]) -> Dict[int, int]:
    """Every replica's data position after a window in which replica r read
    ``window_samples[r]``; shards not in this round (a replica that left) keep theirs."""
    moved = dict(positions)
    for replica, samples in enumerate(window_samples):
        moved[replica] = moved.get(replica, 0) + samples
    return moved
