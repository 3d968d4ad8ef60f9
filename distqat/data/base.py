"""The sampling shared by the dataset-backed tasks (image, text, audio).

A subclass says how many training and held-out samples it has and how to turn sample
indices into tensors; this class says which indices a batch, the eval set and the
calibration batch hold (see :mod:`.shards`), so every task has the same pure
``batch(shard, offset, batch_size)`` and the same resume semantics.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import torch

from .shards import calibration_indices, eval_subset, sample_generator, shard_samples
from .task import Batch, Objective

log = logging.getLogger(__name__)


class IndexedTask:
    objective: Objective
    seed: int
    eval_samples: int

    # --- what a subclass provides -------------------------------------------------------
    def num_train(self) -> int:
        raise NotImplementedError

    def num_eval(self) -> int:
        raise NotImplementedError

    def train_examples(self, indices: List[int],
                       generators: Optional[List[torch.Generator]]) -> Batch:
        """Training samples ``indices``; ``generators`` (one per sample) drive the
        augmentation, None for none (calibration)."""
        raise NotImplementedError

    def eval_examples(self, indices: List[int]) -> Batch:
        raise NotImplementedError

    def model_io(self) -> dict:
        raise NotImplementedError

    # --- the contract --------------------------------------------------------------------
    def sample_ids(self, shard: int, offset: int, batch_size: int) -> List[int]:
        """Training-split indices of ``batch(shard, offset, batch_size)``."""
        return [i for _, i in shard_samples(self.seed, shard, offset, batch_size,
                                            self.num_train())]

    def batch(self, shard: int, offset: int, batch_size: int) -> Batch:
        """Samples ``[offset, offset + batch_size)`` of shard ``shard``: pure."""
        picked = shard_samples(self.seed, shard, offset, batch_size, self.num_train())
        gens = [sample_generator(self.seed, shard, epoch, i) for epoch, i in picked]
        return self.train_examples([i for _, i in picked], gens)

    def eval_set(self) -> Batch:
        """At most ``data.eval_samples`` held-out samples (a fixed, seeded choice)."""
        return self.eval_examples(eval_subset(self.seed, self.num_eval(),
                                              self.eval_samples).tolist())

    def calibration_batch(self, batch_size: int) -> Batch:
        """Un-augmented training samples, the same on every host."""
        idx = calibration_indices(self.seed, self.num_train(), batch_size).tolist()
        return self.train_examples(idx, None)


def stack_labels(labels: List[int], where: str, num_classes: int) -> torch.Tensor:
    y = torch.tensor(labels, dtype=torch.long)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        from .source import DataError
        raise DataError(f"{where}: labels must be in 0..{num_classes - 1}, got "
                        f"{int(y.min())}..{int(y.max())}")
    return y


def count_classes(ds, column: str, given: Optional[int], key: str) -> int:
    """``given`` (``data.args.num_classes``), else the ClassLabel's, else max label + 1."""
    if given is not None:
        return given
    feature = ds.features.get(column)
    if getattr(feature, "num_classes", None):
        return int(feature.num_classes)
    labels = ds[column]
    return int(max(labels)) + 1 if len(labels) else 0
