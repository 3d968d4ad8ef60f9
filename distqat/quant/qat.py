"""Quantization-aware training: swap the layers we know for versions that fake-quantize.
(A little over 300 lines: the layer twins, the converter and its inverse belong together.)

``prepare_qat(model, QATSpec(weight_bits=4))`` walks the model and, for every ``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d`` and GPT-2's ``transformers.pytorch_utils.Conv1D`` that the filter
accepts, changes the layer's class in place to its QAT twin (``QATLinear``, ...). The twin
adds ``weight_fq`` (a per-channel or per-tensor ``FakeQuantizer`` of the weight) and, when
``activation_bits`` is set, ``act_fq`` (a per-tensor quantizer of the layer's *input*), and
its forward runs the float op on the fake-quantized tensors.

Why a class swap rather than a new module: the weight and bias ``Parameter`` objects stay the
same objects, so an optimizer built before ``prepare_qat``, tied weights, hooks and the
state_dict keys (``fc.weight``, ``fc.bias``) all survive; ``strip_qat`` swaps back.

Matching is by exact type, so subclasses with their own use of the weight (e.g. the
``out_proj`` of ``nn.MultiheadAttention``, which never calls its forward) are left alone.

Conventions: weights are signed and symmetric by default (zero point 0, so ``W @ x`` needs
no zero-point correction), per output channel: axis 0 for Linear/Conv weights
``(out, in, ...)``, axis 1 for GPT-2's Conv1D whose weight is stored ``(in, out)``. Input
activations are per-tensor, unsigned and asymmetric (one scale for a tensor whose batch
changes every step; asymmetric because inputs after GELU/ReLU are mostly non-negative).
Weight observers track the current weights (averaging constant 1: weights are not noisy
and the scale should follow them); activation observers use a running average.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fake_quant import MAX_BITS, MIN_BITS, FakeQuantizer

logger = logging.getLogger(__name__)

__all__ = [
    "QATSpec",
    "QATLinear",
    "QATConv1d",
    "QATConv2d",
    "prepare_qat",
    "strip_qat",
    "qat_layers",
    "skip_first_last",
    "is_qat_layer",
    "quantizable_layers",
    "quantizers",
    "qat_param_groups",
    "refresh_qparams",
]

ModuleFilter = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class QATSpec:
    """What ``prepare_qat`` does to each layer it accepts."""

    weight_bits: int = 8
    """Bits of the weight grid, 2..8."""
    activation_bits: Optional[int] = None
    """Bits of the layer's input activation, 2..8; None leaves activations in float."""
    per_channel: bool = True
    """One weight scale per output channel (else one per tensor)."""
    method: str = "minmax"
    """``"minmax"`` (observed range) or ``"lsq"`` (learned step size) for weights and inputs."""
    freeze_after: Optional[int] = None
    """Stop observing / learning scales after this many training forwards. None: never."""
    weight_symmetric: bool = True
    """Weights symmetric (zero point 0) or asymmetric."""
    activation_symmetric: bool = False
    """Inputs symmetric or asymmetric (the default: they are mostly one-signed)."""
    averaging_constant: float = 0.01
    """EMA weight of each new batch in the activation observer."""
    weight_averaging_constant: float = 1.0
    """EMA weight for the weight observer; 1.0 follows the current weights."""

    def __post_init__(self) -> None:
        def bits_ok(b):
            return isinstance(b, int) and not isinstance(b, bool) and MIN_BITS <= b <= MAX_BITS
        if not bits_ok(self.weight_bits):
            raise ValueError(f"weight_bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.weight_bits!r}")
        if self.activation_bits is not None and not bits_ok(self.activation_bits):
            raise ValueError(f"activation_bits must be None or an int in [{MIN_BITS}, {MAX_BITS}], "
                             f"got {self.activation_bits!r}")
        if self.method not in ("minmax", "lsq"):
            raise ValueError(f"method must be 'minmax' or 'lsq', got {self.method!r}")
        if self.freeze_after is not None and (not isinstance(self.freeze_after, int) or self.freeze_after < 1):
            raise ValueError(f"freeze_after must be None or an int >= 1, got {self.freeze_after!r}")
        for name in ("averaging_constant", "weight_averaging_constant"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")


# --------------------------------------------------------------------------- QAT layers

class _QATMixin:
    """Shared by the QAT twins: the quantizers and the quantized weight / input."""

    _float_cls: Type[nn.Module]
    _weight_ch_axis: int = 0
    weight: Tensor

    @classmethod
    def from_float(cls, module: nn.Module, spec: Optional[QATSpec] = None) -> nn.Module:
        """Turn ``module`` (exactly a ``cls._float_cls``) into this QAT class in place; returns it."""
        if type(module) is not cls._float_cls:
            raise ValueError(f"{cls.__name__}.from_float takes a {cls._float_cls.__name__}, "
                             f"got {type(module).__name__}")
        module.__class__ = cls
        module._init_qat(spec if spec is not None else QATSpec())
        return module

    def _init_qat(self, spec: QATSpec) -> None:
        axis = self._weight_ch_axis
        device = self.weight.device
        self.weight_fq = FakeQuantizer(
            spec.weight_bits, signed=True, symmetric=spec.weight_symmetric,
            per_channel=spec.per_channel, ch_axis=axis,
            num_channels=self.weight.shape[axis] if spec.per_channel else None,
            method=spec.method, averaging_constant=spec.weight_averaging_constant,
            freeze_after=spec.freeze_after).to(device)
        if spec.activation_bits is None:
            self.register_module("act_fq", None)
        else:
            self.act_fq = FakeQuantizer(
                spec.activation_bits, signed=False, symmetric=spec.activation_symmetric,
                per_channel=False, method=spec.method, averaging_constant=spec.averaging_constant,
                freeze_after=spec.freeze_after, lsq_init="minmax").to(device)

    def quantized_weight(self) -> Tensor:
        return self.weight_fq(self.weight)

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.act_fq is None else self.act_fq(x)


class QATLinear(_QATMixin, nn.Linear):
    _float_cls = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QATConv1d(_QATMixin, nn.Conv1d):
    _float_cls = nn.Conv1d

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QATConv2d(_QATMixin, nn.Conv2d):
    _float_cls = nn.Conv2d

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


def _gpt2_conv1d() -> Optional[type]:
    """GPT-2's Conv1D class if transformers is already imported (a model holding one implies
    it is), without importing transformers ourselves: that import costs seconds."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


_QAT_CONV1D_CLS: Optional[type] = None


def _qat_gpt2_conv1d_cls() -> type:
    global _QAT_CONV1D_CLS
    if _QAT_CONV1D_CLS is None:
        base = _gpt2_conv1d()

        class QATConv1D(_QATMixin, base):
            """GPT-2 Conv1D: ``y = x @ W + b`` with W stored ``(in, out)``: channels on axis 1."""
            _float_cls = base
            _weight_ch_axis = 1

            def forward(self, x: Tensor) -> Tensor:
                x = self.quantized_input(x)
                size_out = x.size()[:-1] + (self.nf,)
                y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.quantized_weight())
                return y.view(size_out)

        QATConv1D.__module__ = __name__
        _QAT_CONV1D_CLS = QATConv1D
        globals()["QATConv1D"] = QATConv1D  # so torch.save(model) can pickle it by name
    return _QAT_CONV1D_CLS


def __getattr__(name: str):  # `from distqat.quant.qat import QATConv1D`, built on first use
    if name == "QATConv1D":
        if _gpt2_conv1d() is None:
            import transformers.pytorch_utils  # noqa: F401  (explicit request: pay the import)
        return _qat_gpt2_conv1d_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _qat_class_for(module: nn.Module) -> Optional[type]:
    table = {nn.Linear: QATLinear, nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d}
    cls = table.get(type(module))
    if cls is None and type(module) is _gpt2_conv1d():
        cls = _qat_gpt2_conv1d_cls()
    return cls


def is_qat_layer(module: nn.Module) -> bool:
    return isinstance(module, _QATMixin)


def qat_layers(module: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(fully-qualified name, layer) for every QAT layer under ``module`` (root is ``""``)."""
    for fqn, m in module.named_modules():
        if is_qat_layer(m):
            yield fqn, m


def quantizable_layers(module: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(fqn, layer) for every float layer ``prepare_qat`` knows, in ``named_modules`` order."""
    for fqn, m in module.named_modules():
        if _qat_class_for(m) is not None:
            yield fqn, m


def skip_first_last(module: nn.Module) -> ModuleFilter:
    """A ``module_filter_fn`` that leaves the first and last quantizable layers of ``module``
    in full precision (the usual choice: the stem sees raw inputs, the head makes logits).
    "First" and "last" are in registration (``named_modules``) order."""
    names = [fqn for fqn, _ in quantizable_layers(module)]
    keep_float = {names[0], names[-1]} if names else set()
    return lambda mod, fqn: fqn not in keep_float


# --------------------------------------------------------------------------- convert / strip

def prepare_qat(module: nn.Module, spec: Optional[QATSpec] = None, *,
                module_filter_fn: Optional[ModuleFilter] = None, skip: Iterable[str] = (),
                **overrides) -> nn.Module:
    """Make ``module``'s known layers fake-quantize (in place); returns ``module``.

    Args:
        spec: what to quantize; default ``QATSpec()``. Keyword ``overrides`` replace its fields
            (``prepare_qat(stage, spec, weight_bits=4)``: a stage overriding its bit width).
        module_filter_fn: ``fn(layer, fqn) -> bool``; layers for which it is False stay float.
        skip: fully-qualified names of layers to leave in float.

    Layers already converted are left as they are. Output shapes and dtypes do not change.
    """
    spec = spec if spec is not None else QATSpec()
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    skip = set(skip)
    known = {fqn for fqn, _ in quantizable_layers(module)}
    unknown = skip - known - {fqn for fqn, _ in qat_layers(module)}
    if unknown:
        raise ValueError(f"skip names layers that are not quantizable layers of the model: {sorted(unknown)}")
    converted = []
    for fqn, m in list(module.named_modules()):
        cls = _qat_class_for(m)
        if cls is None or fqn in skip:
            continue
        if module_filter_fn is not None and not module_filter_fn(m, fqn):
            continue
        cls.from_float(m, spec)
        converted.append(fqn)
    logger.info("prepare_qat: %d layers fake-quantized (%s)", len(converted), spec)
    return module


def strip_qat(module: nn.Module) -> nn.Module:
    """Undo ``prepare_qat`` in place: QAT layers become their float classes again, keeping their
    (unquantized) float weights. Returns ``module``."""
    for _, m in list(qat_layers(module)):
        del m.weight_fq
        del m.act_fq
        m.__class__ = m._float_cls
    return module


def qat_param_groups(module: nn.Module, *, scale_lr: float) -> List[dict]:
    """Optimizer parameter groups: ``[{params: everything else}, {params: LSQ steps, lr:
    scale_lr, weight_decay: 0}]``.

    Why: Adam's update is about ``lr`` in absolute size whatever the gradient's scale, and an
    8-bit activation step is ~1e-2, so the model's learning rate (1e-3..3e-3) can push a step
    through zero in a few updates (then it is clamped to eps and the layer collapses). Weight
    decay would shrink the steps for no reason. ``scale_lr`` ~ 1e-4..1e-3 works for Adam.
    Empty groups are dropped (no LSQ quantizers: one group).
    """
    scale_ids = {id(fq.scale) for fq in quantizers(module).values() if isinstance(fq.scale, nn.Parameter)}
    params = [p for p in module.parameters() if id(p) not in scale_ids]
    scales = [p for p in module.parameters() if id(p) in scale_ids]
    groups = [{"params": params}] if params else []
    if scales:
        groups.append({"params": scales, "lr": scale_lr, "weight_decay": 0.0})
    return groups


def refresh_qparams(module: nn.Module) -> None:
    """``FakeQuantizer.refresh_qparams`` on every quantizer under ``module``."""
    for fq in quantizers(module).values():
        fq.refresh_qparams()


def quantizers(module: nn.Module) -> Dict[str, FakeQuantizer]:
    """fqn -> FakeQuantizer for every quantizer under ``module``."""
    return {fqn: m for fqn, m in module.named_modules() if isinstance(m, FakeQuantizer)}
