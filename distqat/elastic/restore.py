"""Carrying training across elastic rounds: which outer step to resume from, who holds it,
and handing each stage's state to its new hosts.

Every round starts from scratch (torchrun restarts all workers), so what survives is the
checkpoints on disk. Each member reports the (stage, outer step) checkpoints it can load
(:func:`holdings`: its host's folder and the shared folder, verified). Every rank then
computes the same decision with the pure :func:`choose`: the newest outer step ``k`` that
*every* stage has somewhere (so that the model is resumed as one consistent whole), and
for each stage the lowest rank holding it. That rank loads the state and broadcasts it in
the default group (every rank takes part, so the source need not host the stage now); the
new hosts of the stage install it. Training never silently restarts from random init once
it has begun: a round with some checkpoints but no consistent step, or a restart with
checkpointing off, is an error unless ``param_mirror.allow_fresh_start`` says otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from .. import checkpoint, faults
from ..plan import Member

log = logging.getLogger(__name__)


class RestoreError(RuntimeError):
    """The members cannot resume training consistently; the message says why."""


@dataclass(frozen=True)
class Decision:
    outer_step: int                 # the step every stage resumes from (0: fresh start)
    sources: Dict[int, int]         # stage -> rank that loads and broadcasts its state

    @property
    def fresh(self) -> bool:
        return not self.sources


def holdings(folders: Sequence[Path], num_stages: int) -> Tuple[Tuple[int, int], ...]:
    """(stage, outer step) of every checkpoint in ``folders`` that verifies."""
    held = set()
    for folder in folders:
        for stage in range(num_stages):
            for step in checkpoint.list_checkpoints(folder, stage):
                try:
                    checkpoint.verify(checkpoint.checkpoint_path(folder, stage, step))
                except checkpoint.CheckpointError as e:
                    log.warning("skipping damaged checkpoint: %s", e)
                    continue
                held.add((stage, step))
    return tuple(sorted(held))


def choose(members: Sequence[Member], num_stages: int, *, restarted: bool,
           mirror_enabled: bool, allow_fresh: bool) -> Decision:
    """The resume decision, the same on every rank (pure: members in, decision out)."""
    by_stage: Dict[int, Dict[int, List[int]]] = {s: {} for s in range(num_stages)}
    for m in members:
        for stage, step in m.holds:
            if stage < num_stages:
                by_stage[stage].setdefault(step, []).append(m.rank)
    common = set.intersection(*(set(steps) for steps in by_stage.values()))
    if common:
        k = max(common)
        return Decision(k, {s: min(by_stage[s][k]) for s in range(num_stages)})
    anything = any(by_stage.values())
    if allow_fresh:
        if anything or restarted:
            log.warning("param_mirror.allow_fresh_start: starting from random init although "
                        "training had begun")
        return Decision(0, {})
    if anything:
        missing = [s for s, steps in by_stage.items() if not steps]
        held = {s: sorted(steps) for s, steps in by_stage.items() if steps}
        why = (f"stage(s) {missing} have no checkpoint on any member or in the shared folder"
               if missing else f"no outer step is held for every stage (held: {held})")
        raise RestoreError(f"cannot resume: {why}. Add a host that holds them, or set "
                           f"param_mirror.allow_fresh_start=true to start over")
    if restarted and not mirror_enabled:
        raise RestoreError("cannot resume after a restart: param_mirror.enable is false, so no "
                           "stage state was kept. Set param_mirror.allow_fresh_start=true to "
                           "start over")
    # no checkpoint anywhere: the first outer step was never reached, nothing to lose
    return Decision(0, {})


def load_state(folders: Sequence[Path], stage: int, step: int) -> Dict[str, Any]:
    for folder in folders:
        path = checkpoint.checkpoint_path(folder, stage, step)
        if path.is_file():
            try:
                return checkpoint.load_verified(path)
            except checkpoint.CheckpointError as e:
                log.warning("skipping damaged checkpoint: %s", e)
    raise RestoreError(f"stage {stage} step {step}: no readable checkpoint in "
                       f"{[str(f) for f in folders]} any more")


def exchange(decision: Decision, folders: Sequence[Path], rank: int,
             my_stage: Optional[int]) -> Optional[Dict[str, Any]]:
    """Broadcast each stage's state from its source (stage order, every rank takes part);
    return the state of ``my_stage`` (None for a spare or a fresh start)."""
    mine = None
    if decision.sources:
        faults.point("restore")  # test-only: a host dying mid-restore (distqat/faults.py)
    for stage in sorted(decision.sources):
        src = decision.sources[stage]
        box = [load_state(folders, stage, decision.outer_step) if rank == src else None]
        dist.broadcast_object_list(box, src=src)
        if stage == my_stage:
            mine = box[0]
    return mine
