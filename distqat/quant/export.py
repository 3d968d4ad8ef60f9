"""Export a QAT model as integer weights plus scales (safetensors), and load it back.

File layout (one safetensors file, all tensors under the model's own state_dict keys):

* ``<layer>.weight``: the integers ``q = clamp(round(w/scale) + zp, qmin, qmax)`` of each QAT
  layer. 5..8 bits: ``int8`` (signed) or ``uint8`` (unsigned) in the weight's shape. 2..4
  bits: packed two per byte into a flat ``uint8`` vector, low nibble first, each nibble
  holding ``q - qmin`` (0..15), padded with one zero nibble when the count is odd.
* ``<layer>.weight_fq.scale`` (float32) and ``<layer>.weight_fq.zero_point`` (int32): one per
  channel, or one.
* ``<layer>.act_fq.scale`` / ``.zero_point``: the input-activation qparams when the layer had
  activation quantization.
* Everything else in the state dict (biases, norms, embeddings, buffers) as it was.

Metadata (safetensors' str -> str header): ``distqat.format``; for each quantized tensor
``distqat.q.<layer>.weight`` -> JSON ``{bits, signed, axis, shape, dtype}``; for each
activation quantizer ``distqat.act.<layer>`` -> JSON ``{bits, signed}``; and
``distqat.sha256``: SHA-256 over every tensor's name, dtype, shape and bytes and over the
rest of the metadata, so any altered byte is detected (safetensors checks structure, not
content).

Dequantization is ``(q - zp) * scale`` in float32 cast to the weight's dtype: the same
arithmetic as ``fake_quantize``, so loaded weights equal the fake-quantized weights bit for
bit. 8 bits makes a Linear-dominated model about 1/4 of its fp32 size, 4 bits about 1/8,
plus 8 bytes per output channel for the scale and zero point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..checkpoint.format import hash_tensors
from ..fileio import write_atomic
from .fake_quant import dequantize as _dequantize
from .fake_quant import qrange, quantize
from .qat import qat_layers

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "pack_int", "unpack_int", "export_state", "save_export", "read_export",
           "dequantize_state", "load_export", "load_into"]

FORMAT = "distqat-qat/1"
_CHECKSUM_KEY = "distqat.sha256"
_Q_PREFIX = "distqat.q."
_ACT_PREFIX = "distqat.act."


# --------------------------------------------------------------------------- packing

def pack_int(q: Tensor, bits: int, signed: bool) -> Tensor:
    """Integers in ``qrange(bits, signed)`` to their storage tensor (see the module docstring)."""
    qmin, _ = qrange(bits, signed)
    if bits > 4:
        return q.to(torch.int8 if signed else torch.uint8)
    u = (q.reshape(-1).to(torch.int32) - qmin).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def unpack_int(stored: Tensor, bits: int, signed: bool, shape) -> Tensor:
    """Inverse of ``pack_int``: int32 integers of ``shape``."""
    qmin, _ = qrange(bits, signed)
    numel = 1
    for d in shape:
        numel *= int(d)
    if bits > 4:
        return stored.to(torch.int32).reshape(shape)
    if stored.dtype != torch.uint8 or stored.numel() != (numel + 1) // 2:
        raise ValueError(f"packed {bits}-bit tensor of {stored.numel()} {stored.dtype} bytes "
                         f"cannot hold shape {tuple(shape)}")
    u = torch.stack([stored & 0x0F, stored >> 4], dim=1).reshape(-1)[:numel]
    return (u.to(torch.int32) + qmin).reshape(shape)


# --------------------------------------------------------------------------- export

def _prefix(fqn: str) -> str:
    return f"{fqn}." if fqn else ""


def _checksum(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    hash_tensors(h, tensors)
    rest = sorted((k, v) for k, v in metadata.items() if k != _CHECKSUM_KEY)
    h.update(json.dumps(rest).encode())
    return h.hexdigest()


def export_state(module: nn.Module, metadata: Optional[Mapping[str, str]] = None
                 ) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """``(tensors, metadata)`` for ``module``: QAT layers' weights as integers plus qparams,
    everything else as in ``state_dict()``. Raises ValueError if a QAT layer's weight quantizer
    has never observed its weight (run one forward in train mode first)."""
    meta: Dict[str, str] = {"distqat.format": FORMAT}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str) or k.startswith("distqat."):
            raise ValueError(f"metadata must map str to str outside the 'distqat.' namespace, got {k!r}")
        meta[k] = v
    tensors: Dict[str, Tensor] = {}
    handled = set()
    with torch.no_grad():
        for fqn, layer in qat_layers(module):
            p = _prefix(fqn)
            handled.update(k for k in layer.state_dict(prefix=p) if k != p + "bias")
            fq = layer.weight_fq
            w = layer.weight.detach()
            if not fq.enabled:
                tensors[p + "weight"] = w.cpu().clone()
            else:
                if not fq.initialized:
                    raise ValueError(f"cannot export layer {fqn!r}: its weight quantizer has not observed "
                                     f"the weight yet (run one forward pass in train() mode first)")
                scale, zp = (t.detach() for t in fq.qparams())
                axis = fq._axis(w)
                q = quantize(w, scale, zp, fq.qmin, fq.qmax, axis)
                tensors[p + "weight"] = pack_int(q, fq.bits, fq.signed).cpu().contiguous()
                tensors[p + "weight_fq.scale"] = scale.float().cpu().clone()
                tensors[p + "weight_fq.zero_point"] = zp.to(torch.int32).cpu().clone()
                meta[_Q_PREFIX + p + "weight"] = json.dumps({
                    "bits": fq.bits, "signed": fq.signed, "axis": axis,
                    "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch.")})
            act = layer.act_fq
            if act is not None and act.enabled and act.initialized:
                scale, zp = (t.detach() for t in act.qparams())
                tensors[p + "act_fq.scale"] = scale.float().cpu().clone()
                tensors[p + "act_fq.zero_point"] = zp.to(torch.int32).cpu().clone()
                meta[_ACT_PREFIX + fqn] = json.dumps({"bits": act.bits, "signed": act.signed})
        for name, t in module.state_dict().items():
            if name not in handled:
                # clone: safetensors refuses tensors sharing storage (tied embeddings).
                tensors[name] = t.detach().cpu().clone()
    meta[_CHECKSUM_KEY] = _checksum(tensors, meta)
    return tensors, meta


def save_export(path, module: nn.Module, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``export_state(module)`` to ``path`` (safetensors; written to a temporary file and
    renamed, so a crash never leaves a half-written file under ``path``)."""
    tensors, meta = export_state(module, metadata)
    write_atomic(path, st_save(tensors, metadata=meta))


# --------------------------------------------------------------------------- load

def read_export(path) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """The verified ``(tensors, metadata)`` of an export file. Raises ValueError naming the file
    if it is unreadable, truncated, not ours, or its checksum does not match."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: cannot read export file: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type; normalise it
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupted?): {e}") from e
    if meta.get("distqat.format") != FORMAT:
        raise ValueError(f"{path}: not a distqat export (format {meta.get('distqat.format')!r}, "
                         f"expected {FORMAT!r}), or its header was altered")
    expected = meta.get(_CHECKSUM_KEY)
    if expected is None or _checksum(tensors, meta) != expected:
        raise ValueError(f"{path}: checksum mismatch: the file was altered or corrupted")
    return tensors, meta


def dequantize_state(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Dict[str, Tensor]:
    """The float state dict of the exported model (quantized weights dequantized, quantizer
    qparams dropped): loads into the float model with ``load_state_dict``."""
    out: Dict[str, Tensor] = {}
    qnames = {k[len(_Q_PREFIX):]: json.loads(v) for k, v in metadata.items() if k.startswith(_Q_PREFIX)}
    for name, t in tensors.items():
        if ".weight_fq." in f".{name}" or ".act_fq." in f".{name}":
            continue
        info = qnames.get(name)
        if info is None:
            out[name] = t
            continue
        p = name[: -len("weight")]
        q = unpack_int(t, info["bits"], info["signed"], info["shape"])
        out[name] = _dequantize(q, tensors[p + "weight_fq.scale"], tensors[p + "weight_fq.zero_point"],
                                axis=info["axis"], dtype=getattr(torch, info["dtype"]))
    return out


def load_export(path) -> Dict[str, Tensor]:
    """The float state dict stored in an export file (verified, dequantized)."""
    return dequantize_state(*read_export(path))


def load_into(module: nn.Module, path) -> nn.Module:
    """Load an export into ``module`` (float or QAT-prepared with the same structure).

    Weights become the dequantized integers, equal bit for bit to the exported model's
    fake-quantized weights. In a QAT-prepared module the quantizers also receive the stored
    scales (activation quantization included), so its eval outputs match the exported model's.
    """
    tensors, meta = read_export(path)
    state = dequantize_state(tensors, meta)
    with torch.no_grad():
        for fqn, layer in qat_layers(module):
            p = _prefix(fqn)
            if p + "weight_fq.scale" in tensors:
                layer.weight_fq.set_qparams(tensors[p + "weight_fq.scale"], tensors[p + "weight_fq.zero_point"])
            if layer.act_fq is not None and p + "act_fq.scale" in tensors:
                layer.act_fq.set_qparams(tensors[p + "act_fq.scale"], tensors[p + "act_fq.zero_point"])
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if ".weight_fq." not in f".{k}" and ".act_fq." not in f".{k}"]
    if missing or result.unexpected_keys:
        raise ValueError(f"{os.fspath(path)}: does not match the model: missing {missing}, "
                         f"unexpected {result.unexpected_keys}")
    return module
