"""What the transformers-based families share: importing transformers, the block base class,
HF's own weight initialisation applied to one block, and loading one block's weights from a
local ``from_pretrained`` folder.

Blocks keep their HF submodules under short names (``layer``, ``wte``, ...) and know where
those live in the HF model (``hf_names``), so a block's state-dict key maps to the key of the
HF checkpoint, and the tests can load a whole pipeline's weights into the HF reference model.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

import torch
from torch import nn

from ..compat import import_torchvision

log = logging.getLogger(__name__)


def import_transformers():
    """transformers, imported after torchvision is repaired (transformers imports torchvision
    whenever it is installed; see ``distqat.compat.import_torchvision``)."""
    try:
        import_torchvision()
    except ImportError:
        pass  # not installed: transformers runs without it
    import transformers
    return transformers


def make_config(config_cls: type, pretrained: Optional[str], named: Mapping[str, Any],
                extra: Optional[Mapping[str, Any]], forced: Mapping[str, Any]):
    """An HF config: from ``pretrained``'s ``config.json`` or the class defaults, then the
    named sizes (random init only), ``extra`` (``model_args.config``) and ``forced`` (what
    the block structure needs). Unknown keys in ``extra`` are an error: HF configs would
    silently keep them."""
    defaults = config_cls()
    unknown = sorted(k for k in (extra or {}) if not hasattr(defaults, k))
    if unknown:
        raise ValueError(f"config: {unknown} are not fields of {config_cls.__name__}")
    if pretrained is not None:
        folder = os.fspath(pretrained)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"pretrained: {folder!r} is not a from_pretrained folder "
                             f"(no config.json there)")
        config = config_cls.from_pretrained(folder)
        for k, v in dict(extra or {}).items():
            setattr(config, k, v)
    else:  # through __init__: some fields derive others (wav2vec2's conv_dim -> layer count)
        config = config_cls(**{**dict(named), **dict(extra or {})})
    for k, v in forced.items():
        setattr(config, k, v)
    return config


class HFBlock(nn.Module):
    """A block made of HF submodules. ``hf_names`` maps each child's name to its module path
    in the HF model ``hf_class``; ``source`` is the pretrained folder (None: random init)."""

    hf_class: Type[nn.Module]
    hf_names: Dict[str, str]
    tied: Dict[str, str] = {}  # local key -> checkpoint key it equals when the file ties it

    def __init__(self, config, hf_class: type, hf_names: Mapping[str, str],
                 source: Optional[str]):
        super().__init__()
        self.config = config
        self.hf_class = hf_class
        self.hf_names = dict(hf_names)
        self.source = None if source is None else os.fspath(source)

    def hf_key(self, key: str) -> str:
        child, rest = key.split(".", 1)
        return f"{self.hf_names[child]}.{rest}"

    def extra_init(self) -> None:
        """Random initialisation HF's ``_init_weights`` does not reach (override if needed)."""

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (not in checkpoints; garbage after ``to_empty``)."""


def _post_order(module: nn.Module):
    for child in module.children():
        yield from _post_order(child)
    yield module


def init_hf_block(block: nn.Module) -> None:
    """Random init with the HF model class's ``_init_weights`` (children before parents, as
    ``PreTrainedModel.initialize_weights`` does, so e.g. GPT-2's scaled ``c_proj`` init wins),
    or the block's weights from its pretrained folder."""
    if block.source is not None:
        load_pretrained_block(block)
        return
    host = block.hf_class.__new__(block.hf_class)  # only `config` is read by _init_weights
    nn.Module.__init__(host)
    host.config = block.config
    for p in block.parameters():  # HF's init functions skip tensors flagged as initialised
        if hasattr(p, "_is_hf_initialized"):
            del p._is_hf_initialized
    for m in _post_order(block):
        if m is not block:
            host._init_weights(m)
    block.extra_init()
    block.reset_buffers()


# --------------------------------------------------------------------------- pretrained

def _checkpoint_files(folder: str) -> List[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"pretrained: {folder!r} has no model.safetensors "
                     f"(or model.safetensors.index.json)")


def _candidates(block: HFBlock, key: str) -> List[str]:
    """Checkpoint names that may hold ``key``: its HF name, the name without the base model's
    prefix (a file saved from e.g. ``GPT2Model``), the tensor it is tied to in the file, and
    the pre-parametrization weight-norm names (``weight_g``/``weight_v``)."""
    names = [block.hf_key(key)] + ([block.tied[key]] if key in block.tied else [])
    prefix = getattr(block.hf_class, "base_model_prefix", "")
    names += [n[len(prefix) + 1:] for n in list(names) if prefix and n.startswith(prefix + ".")]
    renames = {"parametrizations.weight.original0": "weight_g",
               "parametrizations.weight.original1": "weight_v"}
    for new, old in renames.items():
        names += [n.replace(new, old) for n in list(names) if new in n]
    return names


def load_pretrained_block(block: HFBlock) -> None:
    """Read only this block's tensors from the safetensors file(s) of ``block.source``."""
    from safetensors import safe_open

    files = _checkpoint_files(block.source)
    handles: List[Tuple[Any, set]] = []
    state = block.state_dict()
    found: Dict[str, torch.Tensor] = {}
    try:
        for path in files:
            h = safe_open(path, framework="pt")
            handles.append((h, set(h.keys())))
        for key in state:
            for name in _candidates(block, key):
                hit = next((h for h, keys in handles if name in keys), None)
                if hit is not None:
                    found[key] = hit.get_tensor(name)
                    break
    finally:
        handles.clear()
    missing = sorted(set(state) - set(found))
    if missing:
        raise ValueError(f"pretrained: {block.source!r} lacks the weights "
                         f"{[block.hf_key(k) for k in missing]}")
    with torch.no_grad():
        for key, t in found.items():
            if tuple(t.shape) != tuple(state[key].shape):
                raise ValueError(f"pretrained: {block.source!r}: {block.hf_key(key)} has shape "
                                 f"{tuple(t.shape)}, the model needs {tuple(state[key].shape)}")
            state[key].copy_(t)
    block.reset_buffers()


def hf_state_dict(blocks: List[nn.Module]) -> Dict[str, torch.Tensor]:
    """The HF model's state dict assembled from all of its blocks (for tests and export)."""
    out: Dict[str, torch.Tensor] = {}
    for b in blocks:
        for k, v in b.state_dict().items():
            out[b.hf_key(k)] = v
    return out
