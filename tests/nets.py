"""Small models the quantization tests share."""

import torch
from torch import nn


def small_mlp(width: int = 32, depth: int = 3, seed: int = 0) -> nn.Sequential:
    """``depth`` Linear layers of ``width`` with ReLUs between them, seeded."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])
