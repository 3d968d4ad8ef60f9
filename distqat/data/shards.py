"""Which training samples a replica reads: a pure function of ``(seed, shard, offset)``.

Replica ``r`` reads shard ``r``: epoch after epoch, its own permutation of the whole
training split, seeded by ``(seed, shard, epoch)``. A replica's position is one integer,
the number of samples it has consumed (``offset``); sample ``offset`` is index
``offset % n`` of epoch ``offset // n``'s permutation. So a replica restored at an offset
continues exactly where it was, with no sample skipped or repeated, and replicas see
different orders of the same data (DiLoCo replicas are meant to differ).
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import torch

from .teacher import _mix

EVAL_STREAM = -1
CALIBRATION_STREAM = -2


@lru_cache(maxsize=8)
def _permutation(seed: int, shard: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, shard, epoch)))


def shard_samples(seed: int, shard: int, offset: int, count: int, n: int
                  ) -> List[Tuple[int, int]]:
    """``(epoch, dataset index)`` of samples ``[offset, offset + count)`` of ``shard``."""
    if shard < 0:
        raise ValueError(f"shard must be >= 0, got {shard}")
    if offset < 0 or count < 0:
        raise ValueError(f"offset and count must be >= 0, got {offset}, {count}")
    if n <= 0:
        raise ValueError("the training split is empty")
    out: List[Tuple[int, int]] = []
    position = offset
    while len(out) < count:
        epoch, start = divmod(position, n)
        take = min(count - len(out), n - start)
        perm = _permutation(seed, shard, epoch, n)
        out.extend((epoch, int(i)) for i in perm[start:start + take])
        position += take
    return out


def sample_generator(seed: int, shard: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's augmentation: the same draw whenever it is read."""
    return torch.Generator().manual_seed(_mix(seed, 0xA06, shard, epoch, index))


def held_out_split(seed: int, n: int, held: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(held-out indices, training indices) of a source that has only one split."""
    if not 0 < held < n:
        raise ValueError(f"data.eval_samples: expected 1..{n - 1} to hold out of a source "
                         f"with one split of {n} samples, got {held}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 0x4E1D)))
    return order[:held].sort().values, order[held:].sort().values


def eval_subset(seed: int, n: int, limit: int) -> torch.Tensor:
    """At most ``limit`` indices of an eval split of ``n``: a fixed, seeded choice (eval
    splits are often sorted by label, so the first ``limit`` would not do)."""
    if n <= limit:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(_mix(seed, EVAL_STREAM))
    return torch.randperm(n, generator=gen)[:limit].sort().values


def calibration_indices(seed: int, n: int, count: int) -> torch.Tensor:
    """Training indices for quantizer calibration: the same on every host."""
    gen = torch.Generator().manual_seed(_mix(seed, CALIBRATION_STREAM))
    perm = torch.randperm(n, generator=gen)
    return perm.repeat((count + n - 1) // n)[:count]
