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

    def _draw(self, shard: int, step: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(_mix(self.seed, shard, step))
        x = torch.randn(batch_size, *self.input_shape, generator=gen)
        return x, self.label(x)

    def batch(self, shard: int, offset: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch of shard ``shard`` (a replica) at sample ``offset``: deterministic.
        The stream is drawn a batch at a time, seeded by the batch number
        ``offset // batch_size``, so offsets are meant to be multiples of the batch size
        (as they are in training: each step consumes one batch)."""
        if shard < 0:
            raise ValueError(f"shard must be >= 0, got {shard}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        return self._draw(shard, offset // batch_size, batch_size)

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
