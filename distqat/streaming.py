"""Streaming DiLoCo (Douillard et al., 2025, "Streaming DiLoCo with overlapping
communication"): a stage's outer step split into fragments whose averages run in the
background while inner steps go on, so the outer-step wait leaves the critical path.

Design (H = ``inner_steps``, N = ``fragments``, tau = ``overlap_steps``):

* **Fragments** are contiguous blocks of the stage's parameter tensors (module order) of
  roughly equal element count (:func:`split_fragments`), computed from the shapes alone,
  so every replica splits alike. Contiguous rather than the paper's strided layers: a
  stage is already a contiguous cut, and its tensors differ too much in size to stride.
* **When.** Fragment f's outer step is *applied* after inner step ``e_f = (f+1)*H // N``
  of the window; its pseudo-gradient ``global_f - local_f`` is taken and its collective
  posted (``async_op``, on the stage group) ``tau`` inner steps earlier, after inner step
  ``e_f - tau`` (:func:`sync_points`). The last fragment's ``e`` is H: it is applied by the
  window-end :meth:`StreamingDiLoCo.outer_step` (the driver's call), together with the
  buffers (averaged / broadcast as in plain DiLoCo, from their values at posting time).
  ``tau < H // N``, so every average is posted after the window's first inner step and
  applied before the next fragment's is posted or at that very step.
* **While in flight** the collective progresses in the process group's own thread; the
  training thread only computes the delta (posting) and, tau steps later, waits for what
  is left of the transfer and applies the outer optimizer (one SGD over all global
  tensors, stepping only those that have a gradient: its state is per tensor, so the same
  whatever N). The local fragment then becomes ``alpha * local + (1 - alpha) * global``
  (``merge_alpha``; 0 takes the global copy exactly and drops the fragment's last tau
  inner steps, as torchft does; alpha > 0 keeps part of them, as the paper's mixing does).
* **Invariant.** After every fragment's outer step the global copies are bit-identical on
  every replica: they start equal (broadcast or restore), each is changed only by a
  fragment's outer step, whose mean every rank forms from the same bytes in the same
  order, and every rank posts the same collectives in the same order (same H, N, tau,
  same inner-step count per window). With alpha 0 the fragment's local tensors are too.
* **Checkpoints** are taken at window ends, where no average is in flight and every
  fragment has taken exactly k outer steps: the checkpoint of outer step k holds every
  fragment's global copy and the outer optimizer's momentum as of that step, i.e. the
  very format of plain DiLoCo, so any N resumes from any other's. Restore sets local =
  global for every fragment: all replicas restart identical at outer step k. What is lost
  beyond plain DiLoCo's (the current window) is the local progress each fragment made
  after its own outer step in window k, which no replica had averaged yet; the replicas'
  local copies differ there, and keeping one replica's would be arbitrary.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist
from torch import nn

from .config import ConfigError, DilocoConfig, OptimConfig
from .diloco import DiLoCo, OuterStepStats, Sync

log = logging.getLogger(__name__)


def split_fragments(sizes: Sequence[int], fragments: int) -> List[List[int]]:
    """Indices of ``sizes`` (element counts of the parameter tensors, in order) cut into
    ``fragments`` contiguous non-empty blocks, each cut where the running total comes
    nearest to an equal share."""
    n = len(sizes)
    if not 1 <= fragments <= n:
        raise ConfigError(f"diloco.fragments: expected 1..{n} (the stage has {n} parameter "
                          f"tensors to split), got {fragments}")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    cuts = [0]
    for f in range(1, fragments):
        target = prefix[-1] * f / fragments
        room = range(cuts[-1] + 1, n - (fragments - f) + 1)  # leave one per later fragment
        cuts.append(min(room, key=lambda i: (abs(prefix[i] - target), i)))
    cuts.append(n)
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]


def sync_points(inner_steps: int, fragments: int, overlap_steps: int) -> List[Tuple[int, int]]:
    """(post, apply) for each fragment: after which inner step of the window its average
    is posted and after which it is applied (the last one's apply is the window's end)."""
    if not 1 <= fragments <= inner_steps:
        raise ConfigError(f"diloco.fragments: expected 1..{inner_steps} (inner_steps), "
                          f"got {fragments}")
    if not 0 <= overlap_steps < inner_steps // fragments:
        raise ConfigError(f"diloco.overlap_steps: expected 0..{inner_steps // fragments - 1},"
                          f" got {overlap_steps}")
    ends = [(f + 1) * inner_steps // fragments for f in range(fragments)]
    return [(end - overlap_steps, end) for end in ends]


class StreamingDiLoCo(DiLoCo):
    """DiLoCo whose outer step is taken fragment by fragment across the window (see the
    module docstring). The stage host calls :meth:`inner_step_done` after every inner step
    and :meth:`outer_step` at the window's end, as for plain DiLoCo."""

    def __init__(self, module: nn.Module, outer_cfg: OptimConfig,
                 group: Optional[dist.ProcessGroup] = None, *, inner_steps: int,
                 fragments: int, overlap_steps: int = 1, merge_alpha: float = 0.0,
                 wire_format: str = "fp32", chunk_size: int = 4096,
                 after_sync: Optional[Callable[[], None]] = None):
        super().__init__(module, outer_cfg, group, wire_format=wire_format,
                         chunk_size=chunk_size, after_sync=after_sync)
        if not 0.0 <= merge_alpha < 1.0:
            raise ConfigError(f"diloco.merge_alpha: expected 0 <= alpha < 1, got {merge_alpha}")
        self.points = sync_points(inner_steps, fragments, overlap_steps)
        self.fragments = split_fragments([p.numel() for p in self.params], fragments)
        self.alpha = merge_alpha
        self.in_flight: Dict[int, Sync] = {}
        self._new_window()

    def _new_window(self) -> None:
        self.position = 0          # inner steps taken in this window
        self.applied: List[int] = []  # fragments whose outer step this window is done
        self.window = {"seconds": 0.0, "wait_seconds": 0.0, "bytes": 0, "norm_sq": 0.0}

    def fragment_outer_steps(self) -> List[int]:
        """How many outer steps each fragment has taken (they differ only mid-window)."""
        return [self.outer_step_count + (f in self.applied) for f in range(len(self.fragments))]

    def _post(self, f: int) -> None:
        sync = self.start_sync(self.fragments[f], with_buffers=f == len(self.fragments) - 1)
        self.in_flight[f] = sync
        self.window["bytes"] += sync.nbytes

    def _apply(self, f: int) -> None:
        waited, norm = self.finish_sync(self.in_flight.pop(f), self.alpha)
        self.window["wait_seconds"] += waited
        self.window["norm_sq"] += norm * norm
        self.applied.append(f)

    def inner_step_done(self) -> None:
        """Apply the fragments due after this inner step, then post those whose average
        starts now (the order every rank keeps)."""
        self.position += 1
        start = time.perf_counter()
        last = len(self.fragments) - 1
        due = [f for f, (_, end) in enumerate(self.points) if end == self.position and f != last]
        posts = [f for f, (post, _) in enumerate(self.points) if post == self.position]
        for f in due:
            if f in self.in_flight:
                self._apply(f)
        for f in posts:
            self._post(f)
        for f in due:  # overlap 0: posted just now, applied at once
            if f not in self.applied:
                self._apply(f)
        if due or posts:
            self.window["seconds"] += time.perf_counter() - start

    def outer_step(self) -> OuterStepStats:
        """The window's end: apply the last fragment (and any not applied yet, posting them
        first, should a window end early), count the outer step, report the window:
        ``seconds`` is the training thread's time on outer-step work in the window,
        ``wait_seconds`` the part of it blocked on collectives."""
        start = time.perf_counter()
        for f in range(len(self.fragments)):
            if f in self.applied:
                continue
            if f not in self.in_flight:
                self._post(f)
            self._apply(f)
        self.outer_step_count += 1
        w = self.window
        stats = OuterStepStats(self.outer_step_count,
                               w["seconds"] + time.perf_counter() - start, w["bytes"],
                               math.sqrt(w["norm_sq"]), w["wait_seconds"])
        self._new_window()
        return stats

    def _at_window_end(self, what: str) -> None:
        if self.in_flight or self.applied:
            raise RuntimeError(f"{what} mid-window: fragments {self.applied} have taken outer "
                               f"step {self.outer_step_count + 1}, the others not; "
                               "checkpoints and restores happen at window ends")

    def state(self):
        """As :meth:`DiLoCo.state`; only at a window's end (every fragment at one step)."""
        self._at_window_end("state()")
        return super().state()

    def load_state(self, state) -> None:
        self._at_window_end("load_state()")
        super().load_state(state)
        self._new_window()

    def broadcast_initial(self) -> None:
        self._at_window_end("broadcast_initial()")
        super().broadcast_initial()
        self._new_window()


def make_diloco(module: nn.Module, dcfg: DilocoConfig, group: Optional[dist.ProcessGroup],
                *, wire_format: str = "fp32", chunk_size: int = 4096,
                after_sync: Optional[Callable[[], None]] = None) -> DiLoCo:
    """The outer-step state ``dcfg`` asks for: plain :class:`DiLoCo` for one fragment (the
    very code path of before streaming), :class:`StreamingDiLoCo` otherwise."""
    if dcfg.fragments == 1:
        return DiLoCo(module, dcfg.outer_optim, group, wire_format=wire_format,
                      chunk_size=chunk_size, after_sync=after_sync)
    log.info("streaming DiLoCo: %d fragments, averages overlap %d inner steps, alpha %g",
             dcfg.fragments, dcfg.overlap_steps, dcfg.merge_alpha)
    return StreamingDiLoCo(module, dcfg.outer_optim, group, inner_steps=dcfg.inner_steps,
                           fragments=dcfg.fragments, overlap_steps=dcfg.overlap_steps,
                           merge_alpha=dcfg.merge_alpha, wire_format=wire_format,
                           chunk_size=chunk_size, after_sync=after_sync)
