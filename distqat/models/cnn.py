"""A small CNN. GroupNorm, not BatchNorm: its output for a sample does not depend on the
other samples of the micro-batch, so a pipeline with micro-batches computes exactly what
the full model computes on the whole batch."""

from __future__ import annotations

from typing import List

from torch import nn

from . import register_model


def _conv_block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                         nn.GroupNorm(min(4, cout), cout), nn.ReLU())


@register_model("cnn")
def cnn_blocks(input_shape: List[int], num_classes: int, width: int = 16) -> List[nn.Module]:
    """Three 3x3 conv blocks (stride 1, 2, 2) → global average pool → Linear."""
    if len(input_shape) == 1:  # a flat feature vector is treated as a 1-channel square image
        side = int(round(input_shape[0] ** 0.5))
        if side * side != input_shape[0]:
            raise TypeError(f"cnn needs data.input_shape [C, H, W] or a square size, "
                            f"got {input_shape}")
        input_shape = [1, side, side]
        first: List[nn.Module] = [nn.Unflatten(1, (1, side, side))]
    elif len(input_shape) == 3:
        first = []
    else:
        raise TypeError(f"cnn needs data.input_shape [C, H, W], got {input_shape}")
    channels = input_shape[0]
    return [
        nn.Sequential(*first, _conv_block(channels, width, 1)),
        _conv_block(width, 2 * width, 2),
        _conv_block(2 * width, 2 * width, 2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)),
    ]
