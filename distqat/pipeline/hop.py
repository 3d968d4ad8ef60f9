"""What crosses a stage boundary: an activation on the way forward, its gradient on the way
back, optionally compressed (``quant.wire.activations``).

* ``fp32``: the tensor itself; distributed autograd records the hop and sends the
  gradient back in the same dtype.
* ``bf16``: the tensor cast to bfloat16 (a differentiable cast), cast back on arrival;
  distributed autograd carries a bfloat16 gradient back: half the bytes both ways.
* ``int8``: one scale per row (``distqat.quant.wire``). An int8 tensor cannot carry a
  gradient, so the hop carries a zero-size *token* that does: the receiver rebuilds the
  activation with :class:`_Dequantize`, whose backward int8-encodes the incoming gradient
  and delivers it to the sender's mailbox with an RPC *before* returning the token's
  (empty) gradient. Distributed autograd then sends that empty gradient to the sender,
  where :class:`_GradPort` picks the delivered gradient out of the mailbox and hands it
  to the sender's graph. Rounding is a straight-through estimator: the gradient of the
  activation is taken to be the gradient of its decoded value, itself int8-rounded.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed.rpc as rpc

from ..quant import wire

# Gradients delivered to this process, waiting for their _GradPort (process-local because
# an RPC names a module-level function, not an object).
_MAILBOX: Dict[str, wire.Encoded] = {}
_MAILBOX_LOCK = threading.Lock()
_KEYS = itertools.count()


@dataclass
class Packed:
    """One activation in transit: ``tensor`` (fp32/bf16), or ``payload`` + ``token`` (int8)."""

    fmt: str
    dtype: torch.dtype
    tensor: Optional[torch.Tensor] = None
    payload: Optional[wire.Encoded] = None
    token: Optional[torch.Tensor] = None
    sender: str = ""
    key: str = ""

    @property
    def nbytes(self) -> int:
        if self.payload is not None:
            return wire.nbytes(self.payload)
        return self.tensor.numel() * self.tensor.element_size()


def _deliver(key: str, grad: wire.Encoded) -> None:
    with _MAILBOX_LOCK:
        _MAILBOX[key] = grad


def _collect(key: str) -> wire.Encoded:
    with _MAILBOX_LOCK:
        try:
            return _MAILBOX.pop(key)
        except KeyError:
            raise RuntimeError(f"no gradient was delivered for activation {key}") from None


class _GradPort(torch.autograd.Function):
    """Sender side: a zero-size token whose backward supplies the gradient of ``y`` that
    the receiver delivered to this process under ``key``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, key: str) -> torch.Tensor:
        ctx.key = key
        ctx.meta = (y.shape, y.dtype, y.device)
        return y.new_zeros(0)

    @staticmethod
    def backward(ctx, _empty: torch.Tensor):
        grad = wire.decode(_collect(ctx.key))
        shape, dtype, device = ctx.meta
        return grad.to(device=device, dtype=dtype).reshape(shape), None


class _Dequantize(torch.autograd.Function):
    """Receiver side: the decoded activation, tied to the token for autograd."""

    @staticmethod
    def forward(ctx, token: torch.Tensor, packed: "Packed", counter: "WireCounter",
                timeout: float) -> torch.Tensor:
        ctx.route = (packed.sender, packed.key, counter, timeout)
        return wire.decode(packed.payload)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sender, key, counter, timeout = ctx.route
        encoded = wire.encode(grad, "int8")
        counter.add(gradient=wire.nbytes(encoded))
        # delivered before this returns, hence before the token's gradient reaches the sender
        rpc.rpc_sync(sender, _deliver, args=(key, encoded), timeout=timeout)
        return grad.new_zeros(0), None, None, None


class WireCounter:
    """Bytes this process sent across stage boundaries (activations forward, gradients
    back); thread-safe, since hops run on RPC threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.activation_bytes = 0
        self.gradient_bytes = 0

    def add(self, activation: int = 0, gradient: int = 0) -> None:
        with self._lock:
            self.activation_bytes += activation
            self.gradient_bytes += gradient


def pack(y: torch.Tensor, fmt: str, counter: WireCounter) -> Packed:
    """Prepare stage output ``y`` (on the CPU) for the next hop."""
    if fmt == "fp32":
        packed = Packed(fmt, y.dtype, tensor=y)
    elif fmt == "bf16":
        packed = Packed(fmt, y.dtype, tensor=y.to(torch.bfloat16))
    elif fmt == "int8":
        sender = rpc.get_worker_info().name
        key = f"{sender}/{next(_KEYS)}"
        token = _GradPort.apply(y, key) if y.requires_grad else None
        packed = Packed(fmt, y.dtype, payload=wire.encode(y, "int8"), token=token,
                        sender=sender, key=key)
    else:
        raise ValueError(f"quant.wire.activations: unknown format {fmt!r}")
    counter.add(activation=packed.nbytes)
    return packed


def unpack(packed: Packed, counter: WireCounter, timeout: float) -> torch.Tensor:
    """The activation a hop carried, connected to the sender's graph for the backward."""
    if packed.payload is None:
        if packed.tensor.requires_grad:  # its gradient will go back in the same dtype
            counter.add(gradient=packed.nbytes)
        return packed.tensor.to(packed.dtype)
    if packed.token is None:  # no backward will come (evaluation)
        return wire.decode(packed.payload)
    return _Dequantize.apply(packed.token, packed, counter, timeout)


__all__ = ["Packed", "WireCounter", "pack", "unpack"]
