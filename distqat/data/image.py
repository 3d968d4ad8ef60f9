"""Image classification (CIFAR-10's schema: an ``img`` Image column and a ``label``).

Preprocessing is ``torchvision.transforms.v2``: to float in [0, 1], normalised by the
channel ``mean``/``std``; training samples are also randomly cropped after zero padding
(``crop_padding``) and flipped horizontally (``flip``), as CIFAR training does. The crop
and the flip are drawn from the sample's own generator, seeded by (seed, shard, epoch,
index), so a batch is the same whenever it is read. Images are decoded per batch (a whole
CIFAR split decoded would be 150 MB in every worker).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch

from .base import IndexedTask, count_classes, stack_labels
from .source import DataError, SourceArgs, describe, open_splits, pick_splits, require_columns
from .task import Batch, Classification

CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2470, 0.2435, 0.2616]


@dataclass
class ImageArgs(SourceArgs):
    """``image_size``: resize every image to this square side (null: keep the size, which
    must then be the same for all). ``channels``: 3 (RGB) or 1 (grey)."""

    image_column: str = "img"
    label_column: str = "label"
    num_classes: Optional[int] = None
    image_size: Optional[int] = None
    channels: int = 3
    crop_padding: int = 4
    flip: bool = True
    mean: List[float] = field(default_factory=lambda: list(CIFAR_MEAN))
    std: List[float] = field(default_factory=lambda: list(CIFAR_STD))

    def columns(self) -> dict:
        return {self.image_column: "data.args.image_column", self.label_column: "data.args.label_column"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channels not in (1, 3):
            raise ValueError(f"data.args.channels: expected 1 or 3, got {self.channels!r}")
        if self.crop_padding < 0:
            raise ValueError(f"data.args.crop_padding: expected >= 0, got {self.crop_padding}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"data.args.image_size: expected null or >= 1, got "
                             f"{self.image_size}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"data.args.num_classes: expected >= 2, got {self.num_classes}")
        for name in ("mean", "std"):
            values = list(getattr(self, name))
            if len(values) != self.channels or (name == "std" and min(values) <= 0):
                raise ValueError(f"data.args.{name}: expected {self.channels} values"
                                 f"{' > 0' if name == 'std' else ''}, got {values}")


def _transforms():
    from ..compat import import_torchvision
    import_torchvision()
    from torchvision.transforms.v2 import functional as F
    return F


def _to_tensor(value: Any, mode: str, where: str) -> torch.Tensor:
    """A decoded image (PIL, or the {bytes, path} of an undecoded one) as uint8 (C, H, W)."""
    import numpy as np
    from PIL import Image
    try:
        if isinstance(value, dict):
            value = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes")
                               else value["path"])
        array = np.asarray(value.convert(mode))
    except Exception as e:
        raise DataError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


class ImageTask(IndexedTask):
    def __init__(self, cfg: Any):
        from .task import task_args
        self.args: ImageArgs = task_args(cfg)
        self.seed, self.eval_samples = cfg.seed, cfg.eval_samples
        self.objective = Classification()
        self.where = describe(cfg)
        self.train, self.held = pick_splits(open_splits(cfg, self.args), self.args,
                                            ("test", "validation", "valid"), cfg.seed,
                                            cfg.eval_samples, self.where)
        for name, ds in (("train", self.train), ("eval", self.held)):
            require_columns(ds, {self.args.image_column: "data.args.image_column",
                                 self.args.label_column: "data.args.label_column"},
                            f"{self.where} ({name} split)")
        self.num_classes = count_classes(self.train, self.args.label_column,
                                         self.args.num_classes, "data.args.num_classes")
        self.F = _transforms()
        self.mode = "RGB" if self.args.channels == 3 else "L"
        first = self._decode(self.train, [0])[0][0]
        self.size: Tuple[int, int] = tuple(first.shape[-2:])  # type: ignore[assignment]

    def num_train(self) -> int:
        return len(self.train)

    def num_eval(self) -> int:
        return len(self.held)

    def model_io(self) -> dict:
        return {"input_shape": [self.args.channels, *self.size],
                "num_classes": self.num_classes}

    def _decode(self, ds, indices: List[int]) -> Tuple[List[torch.Tensor], List[int]]:
        rows = ds[indices]
        out = []
        for i, value in zip(indices, rows[self.args.image_column]):
            img = _to_tensor(value, self.mode, f"{self.where} row {i}")
            if self.args.image_size is not None:
                side = self.args.image_size
                img = self.F.resize(img, [side, side], antialias=True)
            out.append(img)
        return out, rows[self.args.label_column]

    def _finish(self, images: List[torch.Tensor], labels: List[int], where: str) -> Batch:
        for img in images:
            if tuple(img.shape[-2:]) != self.size:
                raise DataError(f"{where}: images of {tuple(img.shape[-2:])} and "
                                f"{self.size}; set data.args.image_size to resize them")
        x = self.F.to_dtype(torch.stack(images), torch.float32, scale=True)
        x = self.F.normalize(x, self.args.mean, self.args.std)
        return x, stack_labels(labels, where, self.num_classes)

    def _augment(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        pad, (h, w) = self.args.crop_padding, self.size
        if pad:
            img = self.F.pad(img, [pad, pad, pad, pad], fill=0)
            top, left = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
            img = self.F.crop(img, top, left, h, w)
        if self.args.flip and torch.rand((), generator=gen) < 0.5:
            img = self.F.horizontal_flip(img)
        return img

    def train_examples(self, indices: List[int],
                       generators: Optional[List[torch.Generator]]) -> Batch:
        images, labels = self._decode(self.train, indices)
        if generators is not None:
            images = [self._augment(img, g) for img, g in zip(images, generators)]
        return self._finish(images, labels, f"{self.where} (train split)")

    def eval_examples(self, indices: List[int]) -> Batch:
        images, labels = self._decode(self.held, indices)
        return self._finish(images, labels, f"{self.where} (eval split)")
