"""Compression of what crosses the wire: activations and their gradients between stages, and
pseudo-gradients in DiLoCo's outer step.

``encode(t, fmt)`` returns an ``Encoded`` (a small picklable dataclass: RPC and
``torch.save`` carry it as is); ``decode(payload)`` gives back a tensor of the original
shape and dtype; ``nbytes(payload)`` is what the payload's tensors weigh.

Formats:

* ``"fp32"``: the tensor as float32 (4 bytes per element; lossless for fp32 input).
* ``"bf16"``: bfloat16 (2 bytes; keeps fp32's exponent range, 8 significant bits: relative
  error <= 2**-8 with round-to-nearest-even).
* ``"int8"``: symmetric int8 with one float32 scale per group, ``scale = absmax / 127``,
  ``q = round(x / scale)`` (half to even) in [-127, 127], so ``|x - q*scale| <= scale/2``
  (up to float rounding of the division). Groups are

  - rows (default) for activations and gradients: a tensor of shape (d0, d1, ...) is read as
    d0 rows of d1*d2*... elements (a 0-d or 1-d tensor is one row), since rows of a batch
    differ in magnitude;
  - chunks of ``chunk_size`` consecutive elements of the flattened tensor when
    ``chunk_size`` is given: for flat pseudo-gradient vectors, where one scale for millions
    of elements would let one outlier erase the rest.

  A group of zeros gets scale 0 and decodes to exact zeros. Cost: 1 byte per element plus
  4 bytes per group, about 1/4 of fp32 for groups of a few hundred elements or more.

Rounding is deterministic (not stochastic): the same input always gives the same bytes, so
every replica that encodes the same tensor sends the same payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["FORMATS", "Encoded", "encode", "decode", "nbytes", "roundtrip"]

FORMATS = ("fp32", "bf16", "int8")
_INT8_MAX = 127


@dataclass
class Encoded:
    """An encoded tensor. ``data`` holds the values (fp32, bf16 or int8); ``scale`` the int8
    group scales (float32) or None; ``chunk_size`` None for per-row groups."""

    fmt: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    data: Tensor
    scale: Optional[Tensor] = None
    chunk_size: Optional[int] = None


def _groups(t: Tensor, chunk_size: Optional[int]) -> Tensor:
    """``t`` as a 2-D (groups, group length) view, zero-padding the last chunk."""
    if chunk_size is None:
        return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)
    flat = t.reshape(-1)
    pad = (-flat.numel()) % chunk_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, chunk_size)


def encode(t: Tensor, fmt: str = "int8", *, chunk_size: Optional[int] = None) -> Encoded:
    """Encode ``t`` (detached) in ``fmt``; ``chunk_size`` selects per-chunk int8 groups."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if not t.is_floating_point():
        raise ValueError(f"encode takes a floating-point tensor, got {t.dtype}")
    t = t.detach()
    shape = tuple(t.shape)
    if fmt == "fp32":
        return Encoded(fmt, shape, t.dtype, t.to(torch.float32).contiguous())
    if fmt == "bf16":
        return Encoded(fmt, shape, t.dtype, t.to(torch.bfloat16).contiguous())
    g = _groups(t.to(torch.float32), chunk_size)
    scale = g.abs().amax(dim=1) / _INT8_MAX
    # Zero groups: divide by 1 instead of 0; their values are 0 and stay 0.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(g / safe[:, None]), -_INT8_MAX, _INT8_MAX).to(torch.int8)
    q = q.reshape(-1)[: t.numel()] if chunk_size is not None else q.reshape(-1)
    return Encoded(fmt, shape, t.dtype, q.contiguous(), scale, chunk_size)


def decode(payload: Encoded) -> Tensor:
    """The tensor ``payload`` encodes, in its original shape and dtype."""
    p = payload
    if p.fmt in ("fp32", "bf16"):
        return p.data.to(p.dtype).reshape(p.shape)
    if p.fmt != "int8":
        raise ValueError(f"unknown wire format {p.fmt!r}")
    numel = p.data.numel()
    if numel == 0:
        return torch.zeros(p.shape, dtype=p.dtype)
    if p.chunk_size is None:
        g = p.data.reshape(p.scale.numel(), -1).to(torch.float32)
        out = g * p.scale[:, None]
    else:
        pad = (-numel) % p.chunk_size
        flat = p.data.to(torch.float32)
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        out = (flat.reshape(-1, p.chunk_size) * p.scale[:, None]).reshape(-1)[:numel]
    return out.reshape(p.shape).to(p.dtype)


def nbytes(payload: Encoded) -> int:
    """Bytes of tensor data in ``payload`` (values plus scales; the few header fields aside)."""
    n = payload.data.numel() * payload.data.element_size()
    if payload.scale is not None:
        n += payload.scale.numel() * payload.scale.element_size()
    return n


def roundtrip(t: Tensor, fmt: str = "int8", *, chunk_size: Optional[int] = None) -> Tensor:
    """``decode(encode(t))``: what the receiver will see, for simulating the wire locally."""
    return decode(encode(t, fmt, chunk_size=chunk_size))
