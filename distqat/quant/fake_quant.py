"""Fake quantization: the numbers, one autograd Function each, and a module that owns them.

Fake quantization rounds a float tensor onto the grid a b-bit integer kernel would use and
hands back floats, so training sees the rounding error while every op stays in floating
point. This module is our own (not ``torch.ao``); its numbers agree bit for bit with
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``
wherever both apply, and the tests compare them. (Over 450 lines on purpose: the
arithmetic, written out below, the autograd Functions that implement it and the
``FakeQuantizer`` module whose two methods, min/max and LSQ, choose between those Functions
are one thing to read together; a fifth of the file is this explanation. ``qat`` holds the
layers that use it, ``export`` the integer side.)

The numbers
-----------
Integer range for ``b`` bits (``qrange``)::

    signed:    qmin = -2**(b-1),  qmax = 2**(b-1) - 1      (8 bits: -128..127, 4 bits: -8..7)
    unsigned:  qmin = 0,          qmax = 2**b - 1          (8 bits: 0..255,    4 bits: 0..15)

Affine quantization with step ``scale`` (> 0) and integer ``zero_point`` (the integer that
represents real 0, so zero padding and ReLU zeros are exact)::

    q     = clamp(round(x * (1/scale)) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

Exactly as torch computes it: ``1/scale`` is taken once in float32 and multiplied (not
``x / scale``, which differs in the last bit and so at rounding ties); ``round`` is
round-half-to-even (``torch.round`` and C's ``nearbyint`` agree: 2.5 -> 2, 3.5 -> 4), which
is unbiased; the zero point is added *after* rounding (it is an integer, so only float
edge cases could tell the orders apart, and torch adds it after). Zero points are integers:
a float zero point is rounded half-to-even and clamped into [qmin, qmax], as torch's
learnable kernels do (torch's float-zero-point per-channel scheme is a different formula
and is not reproduced). Arithmetic is float32 for float32/bf16/fp16 inputs (the result is
cast back to the input's dtype) and float64 for float64 inputs (torch's per-tensor kernel
rounds the float64 output product to float32 first, so there float64 outputs can differ from
torch's in the last bits; per-channel agrees).

Choosing scale and zero point from a range [min, max] (``calculate_qparams``, the same as
``torch.ao`` MinMaxObserver; the range is first widened to include 0)::

    symmetric:   scale = max(|min|, |max|) / ((qmax - qmin) / 2)
                 zero_point = 0 (signed) or 2**(b-1) (unsigned; torch's quint8 default is
                 128 = 2**7 too, but for a custom range it takes (qmin+qmax)//2 = 2**(b-1)-1)
    asymmetric:  scale = (max - min) / (qmax - qmin)
                 zero_point = clamp(qmin - round(min / scale), qmin, qmax)

with ``scale >= eps`` (float32 machine epsilon) so an all-zero tensor does not divide by
zero. Note the symmetric denominator is 127.5 at 8 bits, not 127: +max lands on 127.5,
rounds to 128 and clamps to 127 (torch's convention, kept for agreement).

Why a straight-through estimator
--------------------------------
``round`` has zero derivative almost everywhere, so the true gradient would stop training.
The STE pretends ``round`` is the identity in the backward pass: the gradient passes
unchanged where the value was representable, ``qmin <= round(x/scale) + zp <= qmax``, and is
zero where it was clamped (moving a clamped input cannot change the output). This is the
mask torch uses, computed on the unclamped integer.

Learned step size (LSQ, Esser et al. 2020, arXiv:1902.08153)
-----------------------------------------------------------
The step is a parameter. With ``v = x/scale`` its gradient is the derivative of
``x_hat = scale * clamp(round(v))`` when round is treated straight-through::

    d x_hat / d scale = round(v) - v      if qmin <= round(v)+zp <= qmax
                        qmin - zp         below the range
                        qmax - zp         above the range

scaled by ``g = 1 / sqrt(numel * qmax)`` (numel per channel for per-channel scales) so the
step's update is commensurate with the weights' updates (with SGD; Adam ignores gradient
scale, hence ``qat.qat_param_groups`` and its smaller step learning rate). Inside the range it
is computed as ``(x_hat - x) * (1/scale)`` like ``torch._fake_quantize_learnable_*``, whose
gradients ours equal (torch's per-tensor backward alone reads the zero point as
``int(zp + 0.5)``, which moves negative zero points by one; we use the forward's). The zero
point is not learned. Initial step per the paper: ``2 * mean(|x|) / sqrt(qmax)`` on the first
batch.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "qrange",
    "calculate_qparams",
    "fake_quantize",
    "lsq_quantize",
    "lsq_grad_factor",
    "quantize",
    "dequantize",
    "FakeQuantizer",
]

#: Lower bound on any scale, as in torch.ao observers (float32 machine epsilon).
EPS = torch.finfo(torch.float32).eps

MIN_BITS, MAX_BITS = 2, 8

ScaleLike = Union[Tensor, float]
ZeroPointLike = Union[Tensor, int]


def qrange(bits: int, signed: bool) -> Tuple[int, int]:
    """The integer range ``(qmin, qmax)`` of a ``bits``-bit signed or unsigned integer."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def calculate_qparams(min_val: Tensor, max_val: Tensor, qmin: int, qmax: int, *,
                      symmetric: bool, eps: float = EPS) -> Tuple[Tensor, Tensor]:
    """``(scale float32, zero_point int32)`` covering ``[min_val, max_val]`` (widened to hold 0).

    Works elementwise, so per-channel ranges give per-channel qparams. Matches
    ``torch.ao.quantization.MinMaxObserver.calculate_qparams``.
    """
    scale, zero_point = _qparams_from_range(min_val, max_val, qmin, qmax, symmetric, eps)
    return scale, zero_point.to(torch.int32)


def _qparams_from_range(min_val: Tensor, max_val: Tensor, qmin: int, qmax: int,
                        symmetric: bool, eps: float) -> Tuple[Tensor, Tensor]:
    """``calculate_qparams`` with the zero point left in float32 (an integer value)."""
    min_neg = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
    max_pos = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
    if symmetric:
        scale = torch.clamp(torch.max(-min_neg, max_pos) / (float(qmax - qmin) / 2), min=eps)
        zero_point = torch.full_like(scale, 0 if qmin < 0 else (qmin + qmax + 1) // 2)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=eps)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
    return scale, zero_point


# --------------------------------------------------------------------------- arithmetic

def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _shape_qparams(x: Tensor, scale: ScaleLike, zero_point: ZeroPointLike, qmin: int, qmax: int,
                   axis: Optional[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """scale, 1/scale and the integer bounds ``qmin - zp``, ``qmax - zp``, in x's compute
    dtype, broadcastable to x (the zero point rounded and clamped into [qmin, qmax])."""
    cdt = _compute_dtype(x)
    scale = torch.as_tensor(scale, device=x.device)
    if scale.dtype != torch.float32:
        scale = scale.to(torch.float32)
    zp = torch.as_tensor(zero_point, device=x.device)
    if zp.is_floating_point():
        zp = torch.round(zp)
    zp = torch.clamp(zp.to(torch.float32), qmin, qmax)
    if axis is None:
        if scale.numel() != 1 or zp.numel() != 1:
            raise ValueError(f"per-tensor quantization takes one scale and zero_point, got "
                             f"{scale.numel()} and {zp.numel()} (pass axis= for per-channel)")
        shape = [1] * x.dim()
    else:
        axis = axis % x.dim()
        n = x.shape[axis]
        if scale.numel() != n or zp.numel() != n:
            raise ValueError(f"per-channel quantization along axis {axis} needs {n} scales and "
                             f"zero points, got {scale.numel()} and {zp.numel()}")
        shape = [1] * x.dim()
        shape[axis] = n
    scale = scale.reshape(shape)
    inv_scale = torch.reciprocal(scale)  # float32 reciprocal, as torch's kernels take it
    zp = zp.reshape(shape)
    lo, hi = qmin - zp, qmax - zp  # exact: small integers in float32
    if cdt != torch.float32:
        scale, inv_scale, lo, hi = (t.to(cdt) for t in (scale, inv_scale, lo, hi))
    return scale, inv_scale, lo, hi


def _fq_forward(x: Tensor, scale: Tensor, inv_scale: Tensor, lo: Tensor, hi: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """(x_hat, r = round(x/scale), clamp(r, lo, hi)); x_hat has x's dtype.

    ``clamp(round(x/s) + zp, qmin, qmax) - zp`` is computed as ``clamp(round(x/s), qmin - zp,
    qmax - zp)``: the same numbers (every term is an integer small enough to be exact in
    float32, and a huge ``round(x/s)`` clamps to the same bound either way), in fewer passes
    over the tensor. On small layers fake-quant time is these passes: see ``_in_range``.
    """
    r = torch.round_(x.to(scale.dtype) * inv_scale)
    clamped = torch.clamp(r, min=lo).clamp_(max=hi)
    x_hat = clamped * scale
    return x_hat.to(x.dtype), r, clamped


def _in_range(r: Tensor, clamped: Tensor) -> Tensor:
    """The STE mask as 1.0 / 0.0 in r's dtype: 1 where clamping left ``r`` alone.

    Both are integers, so ``|r - clamped|`` is 0 inside the range and >= 1 outside, and
    ``1 - min(|r - clamped|, 1)`` is the mask. Float arithmetic rather than ``r == clamped``:
    on this CPU build an op that makes or reads a bool tensor costs 4-5x a float op (on
    64x16x8x8: ``eq`` 41 us, ``grad * bool_mask`` 48 us, a float ``sub``/``mul`` 10 us;
    ``bench/fake_quant.py``), and this mask runs in every quantized layer's forward and
    backward. (A NaN input gives
    a NaN gradient here where torch's kernel gives 0; its output is NaN either way.)
    """
    return torch.rsub(torch.sub(r, clamped).abs_().clamp_(max=1.0), 1.0)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a full-size gradient down to the (broadcast) shape of ``like``."""
    dims = [d for d in range(grad.dim()) if like.shape[d] == 1 and grad.shape[d] != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, inv_scale, lo, hi):
        x_hat, r, clamped = _fq_forward(x, scale, inv_scale, lo, hi)
        if ctx.needs_input_grad[0]:  # no mask for inference
            ctx.save_for_backward(_in_range(r, clamped).to(x.dtype))
        return x_hat

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, lo, hi, grad_factor):
        inv_scale = torch.reciprocal(scale.to(torch.float32)).to(scale.dtype)
        x_hat, _, _ = _fq_forward(x, scale, inv_scale, lo, hi)
        ctx.save_for_backward(x, scale, lo, hi)
        ctx.grad_factor = grad_factor
        return x_hat

    @staticmethod
    def backward(ctx, grad):
        x, scale, lo, hi = ctx.saved_tensors
        # Recomputed rather than saved: two full-size tensors less held between passes.
        inv_scale = torch.reciprocal(scale.to(torch.float32)).to(scale.dtype)
        x_hat, r, clamped = _fq_forward(x, scale, inv_scale, lo, hi)
        mask = _in_range(r, clamped).to(grad.dtype)
        xc = x.to(scale.dtype)
        inside = (x_hat.to(scale.dtype) - xc) * inv_scale
        # below the range: qmin - zp = lo; above: qmax - zp = hi
        dq_ds = torch.where(r < lo, lo, torch.where(r > hi, hi, inside))
        grad_c = grad.to(scale.dtype)
        grad_scale = _reduce_to(grad_c * dq_ds * ctx.grad_factor, scale)
        return grad * mask, grad_scale, None, None, None


def fake_quantize(x: Tensor, scale: ScaleLike, zero_point: ZeroPointLike, qmin: int, qmax: int,
                  axis: Optional[int] = None) -> Tensor:
    """``(clamp(round(x/scale) + zp, qmin, qmax) - zp) * scale`` with a straight-through gradient.

    ``axis=None``: one scale/zero point; otherwise one per index along ``axis`` (1-D tensors of
    length ``x.shape[axis]``). No gradient flows to ``scale`` (see ``lsq_quantize``).
    """
    scale_t, inv_scale, lo, hi = _shape_qparams(x, scale, zero_point, qmin, qmax, axis)
    return _FakeQuantizeSTE.apply(x, scale_t.detach(), inv_scale.detach(), lo, hi)


def lsq_grad_factor(x: Tensor, qmax: int, axis: Optional[int] = None) -> float:
    """LSQ gradient scale ``1/sqrt(numel * qmax)``; numel counts one channel when per-channel."""
    numel = x.numel() // (x.shape[axis] if axis is not None else 1)
    return 1.0 / float(max(numel, 1) * qmax) ** 0.5


def lsq_quantize(x: Tensor, scale: Tensor, zero_point: ZeroPointLike, qmin: int, qmax: int,
                 axis: Optional[int] = None, grad_factor: Optional[float] = None) -> Tensor:
    """Fake quantization whose ``scale`` receives the LSQ gradient (the forward equals
    ``fake_quantize``). ``grad_factor`` defaults to ``lsq_grad_factor(x, qmax, axis)``."""
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x, qmax, axis)
    cdt = _compute_dtype(x)
    n = 1 if axis is None else x.shape[axis]
    if scale.numel() != n:
        raise ValueError(f"lsq_quantize needs {n} scale(s) for axis={axis}, got {scale.numel()}")
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis % x.dim()] = n
    _, _, lo, hi = _shape_qparams(x, scale.detach(), zero_point, qmin, qmax, axis)
    # float32 scale first (as the kernels store it), then the compute dtype; both keep the graph.
    scale_c = scale.to(torch.float32).reshape(shape).to(cdt)
    return _LSQ.apply(x, scale_c, lo, hi, grad_factor)


def quantize(x: Tensor, scale: ScaleLike, zero_point: ZeroPointLike, qmin: int, qmax: int,
             axis: Optional[int] = None) -> Tensor:
    """The integers ``clamp(round(x/scale) + zp, qmin, qmax)`` as int32 (same arithmetic as
    ``fake_quantize``, so ``dequantize(quantize(x)) == fake_quantize(x)`` bit for bit)."""
    scale_t, inv_scale, lo, hi = _shape_qparams(x, scale, zero_point, qmin, qmax, axis)
    r = torch.round(x.detach().to(scale_t.dtype) * inv_scale)
    return (torch.clamp(r, lo, hi) + (qmin - lo)).to(torch.int32)  # qmin - lo = zp


def dequantize(q: Tensor, scale: ScaleLike, zero_point: ZeroPointLike, axis: Optional[int] = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q - zp) * scale`` in float32 (float64 if ``dtype`` is), cast to ``dtype``."""
    qf = q.to(torch.float64 if dtype == torch.float64 else torch.float32)
    # any zero point an integer grid can hold (wide bounds, still exact in float32)
    lowest = -(2 ** 23)
    scale_t, _, lo, _ = _shape_qparams(qf, scale, zero_point, lowest, 2 ** 23 - 1, axis)
    return ((qf - (lowest - lo)) * scale_t).to(dtype)  # lowest - lo = zp


# --------------------------------------------------------------------------- the module

_METHODS = ("minmax", "lsq")
_LSQ_INITS = ("mean", "minmax")


class FakeQuantizer(nn.Module):
    """Observes a tensor's range (or learns its step) and fake-quantizes it.

    Args:
        bits: 2..8.
        signed: integer range signed (-2**(b-1)..2**(b-1)-1) or unsigned (0..2**b-1).
        symmetric: zero point fixed (0 signed, 2**(b-1) unsigned) or fit to [min, max].
        per_channel: one scale per index along ``ch_axis`` (weights) instead of one.
        ch_axis: the channel axis (may be negative).
        num_channels: size the per-channel buffers now; else on the first observation.
        method: ``"minmax"`` (running min/max observer) or ``"lsq"`` (learned step size).
        averaging_constant: EMA weight of a new observation, in (0, 1]; 1 tracks the last
            batch. The first observation is taken as is.
        freeze_after: observer updates (minmax) or step learning (lsq) stop after this many
            forward calls in training mode. None: never freeze.
        lsq_init: LSQ initial step: ``"mean"`` (2*mean|x|/sqrt(qmax), the paper's) or
            ``"minmax"`` (the observer's scale).
        enabled: False makes forward the identity.

    Invariants: observers update only in training mode and before ``freeze_after``; eval
    never changes state. Before the first observation forward is the identity (logged
    once). scale/zero_point/min/max and the counters are buffers (the LSQ scale a
    parameter), so ``state_dict`` round-trips, including into a module whose per-channel
    buffers are not yet sized.
    """

    def __init__(self, bits: int = 8, *, signed: bool = True, symmetric: bool = True,
                 per_channel: bool = False, ch_axis: int = 0, num_channels: Optional[int] = None,
                 method: str = "minmax", averaging_constant: float = 0.01,
                 freeze_after: Optional[int] = None, lsq_init: str = "mean",
                 enabled: bool = True, eps: float = EPS) -> None:
        super().__init__()
        self.qmin, self.qmax = qrange(bits, signed)  # raises ValueError naming bits
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        if freeze_after is not None and (not isinstance(freeze_after, int) or freeze_after < 1):
            raise ValueError(f"freeze_after must be None or an int >= 1, got {freeze_after!r}")
        if not isinstance(ch_axis, int):
            raise ValueError(f"ch_axis must be an int, got {ch_axis!r}")
        if num_channels is not None and (not isinstance(num_channels, int) or num_channels < 1):
            raise ValueError(f"num_channels must be None or an int >= 1, got {num_channels!r}")
        if lsq_init not in _LSQ_INITS:
            raise ValueError(f"lsq_init must be one of {_LSQ_INITS}, got {lsq_init!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.bits, self.signed, self.symmetric = bits, bool(signed), bool(symmetric)
        self.per_channel, self.ch_axis = bool(per_channel), ch_axis
        self.method, self.averaging_constant = method, float(averaging_constant)
        self.freeze_after, self.lsq_init = freeze_after, lsq_init
        self.enabled, self.eps = bool(enabled), float(eps)

        n = (num_channels or 0) if per_channel else 1
        self.register_buffer("min_val", torch.full((n,), float("inf")))
        self.register_buffer("max_val", torch.full((n,), float("-inf")))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        if method == "lsq":
            self.scale = nn.Parameter(torch.ones(n))
        else:
            self.register_buffer("scale", torch.ones(n))
        # Counters live in buffers (state_dict) and are mirrored in Python ints so forward never
        # reads a device tensor back: on a GPU `if tensor:` is a host-device sync per call.
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("observations", torch.zeros((), dtype=torch.int64))
        self._steps = 0
        self._observations = 0
        self._warned = False

    # -- state
    @property
    def initialized(self) -> bool:
        """True once scale/zero_point hold a range observed from data (or were set)."""
        return self._observations > 0

    @property
    def frozen(self) -> bool:
        return self.freeze_after is not None and self._steps >= self.freeze_after

    def _axis(self, x: Tensor) -> Optional[int]:
        return self.ch_axis % x.dim() if self.per_channel else None

    def qparams(self) -> Tuple[Tensor, Tensor]:
        """The (scale, zero_point) forward quantizes with, detached (LSQ's scale clamped to eps)."""
        scale = self.scale.detach()
        if self.method == "lsq":
            scale = torch.clamp(scale, min=self.eps)
        return scale, self.zero_point

    @torch.no_grad()
    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Install given qparams (e.g. loaded from an export) and mark the quantizer initialized."""
        for name, value in (("scale", scale), ("zero_point", zero_point)):
            cur = getattr(self, name)
            value = torch.as_tensor(value).to(device=cur.device, dtype=cur.dtype).reshape(-1)
            if cur.shape != value.shape:
                cur.data = torch.empty_like(value)
            cur.copy_(value)
        # A running range that reproduces these qparams, so later observations average into
        # it instead of into +-inf.
        scale, zp = self.scale.detach().float(), self.zero_point.float()
        if self.symmetric:
            hi = scale * ((self.qmax - self.qmin) / 2)
            lo = -hi
        else:
            lo, hi = (self.qmin - zp) * scale, (self.qmax - zp) * scale
        self.min_val.data = lo.to(self.min_val.device)
        self.max_val.data = hi.to(self.max_val.device)
        self._observations = max(self._observations, 1)
        self.observations.fill_(self._observations)

    @torch.no_grad()
    def refresh_qparams(self) -> None:
        """Make a min/max quantizer's scale and zero-point follow its running range again,
        after the range was replaced from outside (DiLoCo averages it across replicas)."""
        if self.method != "minmax" or not self.initialized:
            return
        scale, zero_point = calculate_qparams(self.min_val, self.max_val, self.qmin, self.qmax,
                                              symmetric=self.symmetric, eps=self.eps)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold ``x``'s range into the running min/max and refresh scale/zero_point. The
        range is kept in the buffers' dtype (float64 after ``model.double()``)."""
        x = x.detach().to(self.min_val.dtype)
        axis = self._axis(x)
        if axis is None:
            cur_min, cur_max = torch.aminmax(x)  # 0-d: copied / lerped into the (1,) buffers
        else:
            flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
            cur_min, cur_max = torch.aminmax(flat, dim=1)
            if self.min_val.numel() != cur_min.numel():
                if self.initialized:
                    raise ValueError(f"per-channel quantizer has {self.min_val.numel()} channels, "
                                     f"got a tensor with {cur_min.numel()} along ch_axis={self.ch_axis}")
                self._resize(cur_min.numel())
        if not self.initialized or self.averaging_constant == 1.0:
            self.min_val.copy_(cur_min)
            self.max_val.copy_(cur_max)
        else:  # min + c * (cur - min), one op each
            self.min_val.lerp_(cur_min, self.averaging_constant)
            self.max_val.lerp_(cur_max, self.averaging_constant)
        scale, zero_point = _qparams_from_range(self.min_val, self.max_val, self.qmin, self.qmax,
                                                self.symmetric, self.eps)
        if self.method == "lsq":
            if not self.initialized:  # LSQ: the observer only supplies the first step
                if self.lsq_init == "mean":
                    absx = x.abs() if axis is None else flat.abs()
                    mean = absx.mean() if axis is None else absx.mean(dim=1)
                    scale = torch.clamp(2.0 * mean / self.qmax ** 0.5, min=self.eps)
                    if not self.symmetric:
                        zero_point = torch.clamp(
                            self.qmin - torch.round(torch.clamp(self.min_val, max=0) / scale),
                            self.qmin, self.qmax)
                self.scale.copy_(scale)
                self.zero_point.copy_(zero_point)
        else:
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        self._observations += 1
        self.observations.fill_(self._observations)

    def _resize(self, n: int) -> None:
        for name in ("min_val", "max_val", "scale", "zero_point"):
            cur = getattr(self, name)
            fill = {"min_val": float("inf"), "max_val": float("-inf"), "scale": 1.0, "zero_point": 0}[name]
            cur.data = torch.full((n,), fill, dtype=cur.dtype, device=cur.device)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if x.dtype in (torch.bfloat16, torch.float16):
            # mixed precision: observe ranges and round in float32 (a bfloat16 scale has
            # 8 bits of mantissa, and min/max of bfloat16 values drift), outside autocast
            with torch.autocast(x.device.type, enabled=False):
                return self._quantize(x.float()).to(x.dtype)
        return self._quantize(x)

    def _quantize(self, x: Tensor) -> Tensor:
        learning = self.training and not self.frozen
        if learning and (self.method == "minmax" or not self.initialized):
            self.observe(x)
        if self.training:
            self._steps += 1
            self.steps.fill_(self._steps)
        if not self.initialized:
            if not self._warned:
                logger.warning("FakeQuantizer used before observing any data (eval mode?): "
                               "passing the input through unquantized")
                self._warned = True
            return x
        axis = self._axis(x)
        if self.method == "lsq" and learning:
            scale = torch.clamp(self.scale, min=self.eps)  # keeps the graph: the step learns
            return lsq_quantize(x, scale, self.zero_point, self.qmin, self.qmax, axis)
        return _FakeQuantizeSTE.apply(x, *self._grid(x, axis))

    def _grid(self, x: Tensor, axis: Optional[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``_shape_qparams`` for our own buffers, in as few ops as possible: their shapes and
        dtypes are known, and on small layers every op is a measurable share of the step
        (through ``fake_quantize`` instead, an activation quantizer's forward + backward
        took ~280 us instead of ~255 in ``bench/fake_quant.py``)."""
        scale, zero_point = self.qparams()
        if scale.numel() != (1 if axis is None else x.shape[axis]) or x.dtype == torch.float64:
            return _shape_qparams(x, scale, zero_point, self.qmin, self.qmax, axis)
        if axis is not None:  # per-tensor (1,) buffers broadcast as they are
            shape = [1] * x.dim()
            shape[axis] = -1
            scale, zero_point = scale.view(shape), zero_point.view(shape)
        zp = torch.clamp(zero_point.to(torch.float32), self.qmin, self.qmax)
        return scale, torch.reciprocal(scale), self.qmin - zp, self.qmax - zp

    # -- state_dict: size lazily-sized buffers to what is loaded, then refresh the mirrors
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("min_val", "max_val", "scale", "zero_point"):
            key = prefix + name
            cur = getattr(self, name)
            if key in state_dict and state_dict[key].shape != cur.shape:
                cur.data = torch.empty(state_dict[key].shape, dtype=cur.dtype, device=cur.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # One host read per load, never per step.
        self._steps = int(self.steps)
        self._observations = int(self.observations)

    def extra_repr(self) -> str:
        kind = f"per_channel(axis={self.ch_axis})" if self.per_channel else "per_tensor"
        return (f"bits={self.bits}, signed={self.signed}, symmetric={self.symmetric}, {kind}, "
                f"method={self.method}, freeze_after={self.freeze_after}, enabled={self.enabled}")
