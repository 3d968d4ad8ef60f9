"""Model registry: a name → a list of blocks, cut into pipeline stages.

A model builder returns the model as an ordered list of plain ``nn.Module`` blocks whose
composition is the whole network; it knows nothing about distribution. ``build_stages``
cuts the blocks into contiguous stages balanced by parameter count, and ``{name}.full``
names the whole model as one module (the single-process baseline). Builders are seeded
here, so a stage built on any host starts from the same weights as the same layers of
the full model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch
from torch import nn

FULL_SUFFIX = ".full"

BlockBuilder = Callable[..., List[nn.Module]]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build_blocks: BlockBuilder
    doc: str


_MODELS: Dict[str, ModelSpec] = {}


def register_model(name: str) -> Callable[[BlockBuilder], BlockBuilder]:
    """Register ``fn(input_shape, num_classes, **model_args) -> list[nn.Module]``."""

    def wrap(fn: BlockBuilder) -> BlockBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelSpec(name, fn, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def available_models() -> List[str]:
    return sorted(_MODELS)


def _spec(name: str) -> ModelSpec:
    base = name[: -len(FULL_SUFFIX)] if name.endswith(FULL_SUFFIX) else name
    if base not in _MODELS:
        raise ValueError(f"model_pipeline.model: unknown model {name!r}; "
                         f"known: {available_models()}")
    return _MODELS[base]


def check_model(name: str, model_args: Mapping[str, Any] | None = None) -> None:
    """Fail early (before any process starts) on an unknown model or arguments its
    builder does not take; raises ValueError naming the field."""
    spec = _spec(name)
    try:
        inspect.signature(spec.build_blocks).bind([1], 2, **dict(model_args or {}))
    except TypeError as e:
        raise ValueError(f"model_pipeline.model_args for {spec.name!r}: {e}") from None


def build_blocks(name: str, *, input_shape: Sequence[int], num_classes: int, seed: int,
                 model_args: Mapping[str, Any] | None = None) -> List[nn.Module]:
    """The model's blocks, initialised from ``seed`` (same weights on every host)."""
    spec = _spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return spec.build_blocks(list(input_shape), num_classes, **dict(model_args or {}))
        except TypeError as e:
            raise ValueError(f"model_pipeline.model_args for {spec.name!r}: {e}") from None


def split_blocks(blocks: Sequence[nn.Module], num_stages: int) -> List[List[nn.Module]]:
    """Cut ``blocks`` into ``num_stages`` contiguous non-empty groups, balancing the number
    of parameters (a proxy for compute) with a greedy pass over the cumulative count."""
    if not 1 <= num_stages <= len(blocks):
        raise ValueError(f"model_pipeline.num_stages: the model has {len(blocks)} blocks, "
                         f"so it can be cut into 1..{len(blocks)} stages, not {num_stages}")
    sizes = [max(1, sum(p.numel() for p in b.parameters())) for b in blocks]
    total = sum(sizes)
    groups: List[List[nn.Module]] = []
    start, running = 0, 0
    for stage in range(num_stages - 1):
        target = total * (stage + 1) / num_stages
        end = start + 1  # every stage takes at least one block
        running += sizes[start]
        # stop early enough to leave one block for each remaining stage
        last_allowed = len(blocks) - (num_stages - stage - 1)
        while end < last_allowed and abs(running + sizes[end] - target) < abs(running - target):
            running += sizes[end]
            end += 1
        groups.append(list(blocks[start:end]))
        start = end
    groups.append(list(blocks[start:]))
    return groups


def build_stages(name: str, num_stages: int, *, input_shape: Sequence[int], num_classes: int,
                 seed: int, model_args: Mapping[str, Any] | None = None) -> List[nn.Module]:
    """The model cut into ``num_stages`` modules; ``{name}.full`` gives one module."""
    blocks = build_blocks(name, input_shape=input_shape, num_classes=num_classes, seed=seed,
                          model_args=model_args)
    if name.endswith(FULL_SUFFIX):
        return [nn.Sequential(*blocks)]
    return [nn.Sequential(*group) for group in split_blocks(blocks, num_stages)]


def build_full(name: str, **kwargs: Any) -> nn.Module:
    """``{name}.full``: the whole model in one module, the single-process twin."""
    base = name[: -len(FULL_SUFFIX)] if name.endswith(FULL_SUFFIX) else name
    return build_stages(base + FULL_SUFFIX, 1, **kwargs)[0]


from . import cnn, mlp  # noqa: E402,F401  (registers the built-in models)
