"""The teacher task: inputs drawn from N(0, 1), labels from a fixed random network.

Everything is a pure function of ``(seed, shard, offset)``, so a replica's data position
is one integer (samples consumed), a restarted replica sees exactly the batches it would have seen, and
replicas (shards) see different data. The held-out evaluation set comes from its own
stream and never overlaps the training stream.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from ..config import DataConfig
from .task import Classification

_MASK64 = (1 << 64) - 1
_EVAL_SHARD = -1
_CALIBRATION_SHARD = -2
BLOCK = 64  # training samples drawn per seed: a batch is the blocks that cover it


def _mix(*values: int) -> int:
    """splitmix64 over a tuple of ints: a 63-bit seed for torch.Generator."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


class TeacherTask:
    """Labels are the argmax of a seeded two-layer tanh network over the flattened input."""

    def __init__(self, cfg: DataConfig):
        self.input_shape = tuple(cfg.input_shape)
        self.num_classes = cfg.num_classes
        self.seed = cfg.seed
        self.eval_samples = cfg.eval_samples
        self.objective = Classification()
        in_features = math.prod(self.input_shape)
        gen = torch.Generator().manual_seed(_mix(self.seed, 0x7EAC))
        self._w1 = torch.randn(in_features, cfg.teacher_hidden, generator=gen) / math.sqrt(in_features)
        self._w2 = torch.randn(cfg.teacher_hidden, cfg.num_classes, generator=gen)

    @torch.no_grad()
    def label(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x.flatten(1).float() @ self._w1)
        return (h @ self._w2).argmax(dim=1)

    def _inputs(self, shard: int, number: int, count: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_mix(self.seed, shard, number))
        return torch.randn(count, *self.input_shape, generator=gen)

    def _draw(self, shard: int, number: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self._inputs(shard, number, count)
        return x, self.label(x)

    def batch(self, shard: int, offset: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Samples ``[offset, offset + batch_size)`` of shard ``shard``'s stream (a
        replica's): deterministic, whatever the batch sizes that led there. The stream is
        drawn in blocks of :data:`BLOCK` samples, each seeded by its number, so a replica
        whose batch size changes (``diloco.balance``) reads on without seeing a sample
        twice."""
        if shard < 0:
            raise ValueError(f"shard must be >= 0, got {shard}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        first, last = offset // BLOCK, (offset + batch_size - 1) // BLOCK
        x = torch.cat([self._inputs(shard, block, BLOCK) for block in range(first, last + 1)])
        x = x[offset - first * BLOCK:][:batch_size]
        return x, self.label(x)

    def eval_set(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The held-out set, disjoint from every training shard's stream."""
        return self._draw(_EVAL_SHARD, 0, self.eval_samples)

    def calibration_batch(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inputs for setting quantizer ranges before training, from a stream of their own
        (the same on every host, so every replica starts with the same ranges)."""
        return self._draw(_CALIBRATION_SHARD, 0, batch_size)

    def model_io(self) -> dict:
        """What a model builder needs to know of the data."""
        return {"input_shape": list(self.input_shape), "num_classes": self.num_classes}
