"""A real small dataset that needs no download: 8x8 handwritten digits (see files/README.md).

The file is read from ``data.path`` (a CSV, optionally gzipped: 64 pixel values then the
label per row) or, by default, from the copy shipped in ``distqat/data/files``. A fixed
split by ``data.seed`` holds out ``data.eval_samples`` images; training batches are drawn
without replacement from per-shard shuffles, epoch by epoch, so a batch is a pure function
of ``(seed, shard, offset)`` like the teacher task's, and replicas see different orders.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..config import DataConfig
from .task import Classification
from .teacher import _mix

BUNDLED = Path(__file__).resolve().parent / "files" / "digits.csv.gz"
SIDE = 8
PIXEL_MAX = 16.0


def read_digits(path: Optional[str | Path] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 8, 8) scaled to [0, 1], labels (N,)) from the CSV at ``path``."""
    path = Path(path) if path else BUNDLED
    if not path.is_file():
        raise ValueError(f"data.path: {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as raw:
            rows = list(csv.reader(io.TextIOWrapper(raw, encoding="ascii")))
        values = torch.tensor([[float(v) for v in row] for row in rows if row])
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"data.path: {path} is not a digits CSV ({e})") from None
    if values.dim() != 2 or values.shape[1] != SIDE * SIDE + 1:
        raise ValueError(f"data.path: {path}: expected rows of {SIDE * SIDE} pixels and a "
                         f"label, got {values.shape[1] if values.dim() == 2 else 0} columns")
    images = (values[:, :-1] / PIXEL_MAX).reshape(-1, 1, SIDE, SIDE)
    return images, values[:, -1].long()


class DigitsTask:
    def __init__(self, cfg: DataConfig):
        images, labels = read_digits(cfg.path)
        if not 0 < cfg.eval_samples < len(labels):
            raise ValueError(f"data.eval_samples: expected 1..{len(labels) - 1} for digits, "
                             f"got {cfg.eval_samples}")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(
            _mix(cfg.seed, 0xD161)))
        held, train = order[: cfg.eval_samples], order[cfg.eval_samples:]
        mean, std = images[train].mean(), images[train].std()
        images = (images - mean) / std
        self.train_x, self.train_y = images[train], labels[train]
        self.eval_x, self.eval_y = images[held], labels[held]
        self.seed = cfg.seed
        self.num_classes = 10
        self.objective = Classification()

    def sample_ids(self, shard: int, offset: int, batch_size: int) -> List[int]:
        """Training indices of samples ``[offset, offset + batch_size)`` of ``shard``."""
        n = len(self.train_y)
        idx: List[int] = []
        while len(idx) < batch_size:
            epoch, start = divmod(offset + len(idx), n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(
                _mix(self.seed, shard, epoch)))
            idx.extend(perm[start: start + batch_size - len(idx)].tolist())
        return idx

    def batch(self, shard: int, offset: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(self.sample_ids(shard, offset, batch_size), dtype=torch.long)
        return self.train_x[index], self.train_y[index]

    def eval_set(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.eval_x, self.eval_y

    def calibration_batch(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.batch(shard=0, offset=0, batch_size=batch_size)

    def model_io(self) -> dict:
        return {"input_shape": [1, SIDE, SIDE], "num_classes": self.num_classes}
