"""A small MLP: the default model, quick on a laptop CPU."""

from __future__ import annotations

import math
from typing import List

from torch import nn

from . import register_model


@register_model("mlp")
def mlp_blocks(input_shape: List[int], num_classes: int, hidden: int = 128,
               depth: int = 4) -> List[nn.Module]:
    """Flatten → ``depth`` Linear+ReLU blocks of width ``hidden`` → Linear classifier."""
    if depth < 1 or hidden < 1:
        raise TypeError(f"hidden and depth must be >= 1, got hidden={hidden}, depth={depth}")
    in_features = math.prod(input_shape)
    blocks: List[nn.Module] = [nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(depth - 1)]
    blocks.append(nn.Linear(hidden, num_classes))
    return blocks
