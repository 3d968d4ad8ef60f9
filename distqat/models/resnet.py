"""ResNet-18/50/101: torchvision's builders, cut into stem, residual blocks and head.

Blocks: the stem (conv, norm, ReLU, max-pool), then every residual block of ``layer1`` ..
``layer4`` on its own, then the head (average pool, flatten, ``fc``); their composition is
torchvision's ``ResNet.forward``. Initialisation is torchvision's: Kaiming-normal
(``fan_out``, ReLU) convolutions, norms at weight 1 / bias 0, ``fc`` at ``nn.Linear``'s
default.

``cifar_stem`` (default True) replaces the 7x7 stride-2 convolution and the max-pool by one
3x3 stride-1 convolution, the usual stem for 32x32 images (the ImageNet stem would leave a
32x32 image at 8x8 before the first residual block).

``norm``:

* ``"batch"`` (torchvision's default) normalises with the statistics of the batch a stage
  sees. In a pipeline that is one micro-batch, so a pipeline with several micro-batches
  does not compute what the whole model computes on the whole batch (close, not equal), and
  each micro-batch updates the running statistics once. DiLoCo averages only parameters:
  the running means and variances (buffers) stay each replica's own, estimated on its own
  shard, and are not synchronised at outer steps.
* ``"group"``: ``GroupNorm(32, C)`` (every ResNet width is a multiple of 32). A sample's
  output does not depend on the other samples, so micro-batching is exact and there is no
  buffer to keep in sync.

``layers`` (blocks per stage, e.g. ``[1, 1, 1, 1]``) and ``width_per_group`` (bottleneck
width; ResNet-50/101 only, torchvision's BasicBlock supports 64 only) make small variants
of the same code for tests.
"""

from __future__ import annotations

from functools import partial
from typing import List, Optional

from torch import nn

from ..compat import import_torchvision
from . import register_model

_NORMS = ("batch", "group")


def init_resnet_block(block: nn.Module) -> None:
    """torchvision's ``ResNet.__init__`` rules, applied to one block."""
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


def _resnet_blocks(arch: str, default_layers: List[int], input_shape: List[int],
                   num_classes: int, cifar_stem: bool, norm: str,
                   layers: Optional[List[int]], width_per_group: int) -> List[nn.Module]:
    if len(input_shape) != 3:
        raise ValueError(f"{arch} needs data.input_shape [C, H, W], got {list(input_shape)}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {list(_NORMS)}, got {norm!r}")
    layers = list(default_layers if layers is None else layers)
    if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
        raise ValueError(f"layers must be 4 ints >= 1, got {layers}")
    models = import_torchvision().models
    block_cls = models.resnet.BasicBlock if arch == "resnet18" else models.resnet.Bottleneck
    if block_cls is models.resnet.BasicBlock and width_per_group != 64:
        raise ValueError(f"width_per_group is 64 for {arch} (BasicBlock), got {width_per_group}")
    norm_layer = nn.BatchNorm2d if norm == "batch" else partial(nn.GroupNorm, 32)
    net = models.resnet.ResNet(block_cls, layers, num_classes=num_classes,
                               width_per_group=width_per_group, norm_layer=norm_layer)
    channels = int(input_shape[0])
    if cifar_stem:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    blocks: List[nn.Module] = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)]
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        blocks.extend(layer)
    blocks.append(nn.Sequential(net.avgpool, nn.Flatten(1), net.fc))
    return blocks


@register_model("resnet18", init=init_resnet_block)
def resnet18_blocks(input_shape: List[int], num_classes: int, cifar_stem: bool = True,
                    norm: str = "batch", layers: Optional[List[int]] = None,
                    width_per_group: int = 64) -> List[nn.Module]:
    """ResNet-18 (torchvision): stem, 8 BasicBlocks, head."""
    return _resnet_blocks("resnet18", [2, 2, 2, 2], input_shape, num_classes, cifar_stem,
                          norm, layers, width_per_group)


@register_model("resnet50", init=init_resnet_block)
def resnet50_blocks(input_shape: List[int], num_classes: int, cifar_stem: bool = True,
                    norm: str = "batch", layers: Optional[List[int]] = None,
                    width_per_group: int = 64) -> List[nn.Module]:
    """ResNet-50 (torchvision): stem, 16 Bottlenecks, head."""
    return _resnet_blocks("resnet50", [3, 4, 6, 3], input_shape, num_classes, cifar_stem,
                          norm, layers, width_per_group)


@register_model("resnet101", init=init_resnet_block)
def resnet101_blocks(input_shape: List[int], num_classes: int, cifar_stem: bool = True,
                     norm: str = "batch", layers: Optional[List[int]] = None,
                     width_per_group: int = 64) -> List[nn.Module]:
    """ResNet-101 (torchvision): stem, 33 Bottlenecks, head."""
    return _resnet_blocks("resnet101", [3, 4, 23, 3], input_shape, num_classes, cifar_stem,
                          norm, layers, width_per_group)
