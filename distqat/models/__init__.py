"""Model registry: a name -> an ordered list of blocks, any contiguous run of which is a stage.

A family registers ``fn(**io, **model_args) -> List[nn.Module]``: plain blocks, one tensor in
and one tensor out, whose composition is the whole network; it knows nothing about
distribution. ``io`` is what the task says about its data (``input_shape``/``num_classes``
for classification and audio, ``vocab_size``/``seq_len`` for causal LM); a builder names the
io keys it uses as parameters, everything else it takes is a ``model_args`` field.

What holds, and why:

* **A stage never holds the whole model.** ``build_blocks`` builds the model on the meta
  device (no memory), keeps the wanted blocks, materialises only those and initialises them.
* **A stage built alone equals the same blocks of the whole model, bit for bit.** Block ``i``
  is initialised from a seed derived from ``(seed, i)`` only, with the family's own rules
  (its ``init``; default: every submodule's ``reset_parameters``).
* **Stages balance compute, not parameters.** ``block_costs`` counts the FLOPs of one sample
  through each block (a meta-device forward under ``FlopCounterMode``): an embedding lookup
  has many parameters and almost no compute. ``cut_points`` splits the cumulative cost.

The single-process twin is ``mode: baseline``: the same blocks, cut into one stage.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

IO_KEYS = ("input_shape", "num_classes", "vocab_size", "seq_len")

BlockBuilder = Callable[..., List[nn.Module]]
BlockInit = Callable[[nn.Module], None]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    fn: BlockBuilder
    init: Optional[BlockInit]
    doc: str


_MODELS: Dict[str, ModelSpec] = {}


def register_model(name: str, *, init: Optional[BlockInit] = None
                   ) -> Callable[[BlockBuilder], BlockBuilder]:
    """Register a block builder; ``init(block)`` initialises one materialised block from the
    (already seeded) global RNG. Without ``init`` each submodule's ``reset_parameters`` runs."""

    def wrap(fn: BlockBuilder) -> BlockBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelSpec(name, fn, init, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def available_models() -> List[str]:
    return sorted(_MODELS)


def _spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise ValueError(f"model_pipeline.model: unknown model {name!r}; "
                         f"known: {available_models()}")
    return _MODELS[name]


def _args_error(spec: ModelSpec, e: Exception) -> ValueError:
    return ValueError(f"model_pipeline.model_args for {spec.name!r}: {e}")


def check_model(name: str, model_args: Mapping[str, Any] | None = None) -> None:
    """Fail early (before any process starts) on an unknown model or ``model_args`` its
    builder does not take; raises ValueError naming the field. Values are checked when the
    model is built (the task's io is not known here)."""
    spec = _spec(name)
    args = dict(model_args or {})
    io_given = sorted(set(args) & set(IO_KEYS))
    if io_given:
        raise _args_error(spec, f"{io_given} come from the task's data, not from model_args")
    try:
        inspect.signature(spec.fn).bind_partial(**args)
    except TypeError as e:
        raise _args_error(spec, e) from None


def _call(spec: ModelSpec, io: Mapping[str, Any], model_args: Mapping[str, Any] | None):
    check_model(spec.name, model_args)
    params = inspect.signature(spec.fn).parameters
    io_used = {k: v for k, v in io.items() if k in params}
    for k, p in params.items():
        if k in IO_KEYS and k not in io and p.default is inspect.Parameter.empty:
            raise ValueError(f"model_pipeline.model: {spec.name!r} needs {k!r} from the task, "
                             f"which gives {sorted(io)}")
    try:
        return spec.fn(**io_used, **dict(model_args or {}))
    except (TypeError, ValueError) as e:
        raise _args_error(spec, e) from None


def block_seed(seed: int, index: int) -> int:
    """The seed of block ``index``: depends on ``(seed, index)`` only."""
    digest = hashlib.sha256(f"distqat-block:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _default_init(block: nn.Module) -> None:
    for m in block.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def build_blocks(name: str, *, io: Mapping[str, Any], seed: int,
                 model_args: Mapping[str, Any] | None = None,
                 blocks: Optional[range] = None) -> List[nn.Module]:
    """Blocks ``blocks`` (default: all) of the model, on the CPU, in float32, initialised from
    ``seed``: the same values whichever other blocks are built with them."""
    spec = _spec(name)
    with torch.device("meta"):
        everything = _call(spec, io, model_args)
    n = len(everything)
    wanted = range(n) if blocks is None else blocks
    if len(wanted) == 0 or wanted.step != 1 or wanted.start < 0 or wanted.stop > n:
        raise ValueError(f"blocks {wanted} is not a non-empty contiguous part of the "
                         f"{n} blocks of {spec.name!r}")
    kept = [everything[i] for i in wanted]
    del everything
    init = spec.init or _default_init
    for i, block in zip(wanted, kept):
        block.to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(block_seed(seed, i))
            with torch.no_grad():
                init(block)
    return kept


def meta_blocks(name: str, *, io: Mapping[str, Any],
                model_args: Mapping[str, Any] | None = None) -> List[nn.Module]:
    """All blocks on the meta device: the model's structure (names, shapes) at no cost."""
    with torch.device("meta"):
        return _call(_spec(name), io, model_args)


def sample_input(io: Mapping[str, Any], batch: int = 1, device: Any = "cpu") -> torch.Tensor:
    """A zero batch shaped as the task's data: token ids ``(B, seq_len)`` for a language
    model (``vocab_size`` in io), else float ``(B, *input_shape)``."""
    if "vocab_size" in io:
        return torch.zeros(batch, int(io["seq_len"]), dtype=torch.long, device=device)
    return torch.zeros(batch, *[int(d) for d in io["input_shape"]], device=device)


def block_costs(name: str, *, io: Mapping[str, Any],
                model_args: Mapping[str, Any] | None = None) -> List[float]:
    """FLOPs of one sample through each block (forward; backward is about twice that,
    everywhere alike). Counted over a meta-device forward, so nothing is allocated; a block
    the counter cannot run through is estimated as 2 FLOPs per parameter outside embeddings
    (logged)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = _spec(name)
    model = meta_blocks(name, io=io, model_args=model_args)
    x = sample_input(io, device="meta")
    costs: List[float] = []
    for i, block in enumerate(model):
        block.eval()
        counter = FlopCounterMode(display=False)
        try:
            with counter, torch.no_grad():
                x = block(x)
            costs.append(float(counter.get_total_flops()))
        except Exception as e:  # noqa: BLE001  (estimate instead; the model still builds)
            log.warning("%s block %d: FLOPs not countable on meta (%s); estimating from "
                        "parameters", spec.name, i, e)
            costs.extend(_param_flops(b) for b in model[i:])
            break
    return costs


def _param_flops(block: nn.Module) -> float:
    embedding = {id(p) for m in block.modules() if isinstance(m, nn.Embedding)
                 for p in m.parameters()}
    return 2.0 * sum(p.numel() for p in block.parameters() if id(p) not in embedding)


def cut_points(costs: Sequence[float], num_stages: int) -> List[int]:
    """Stage ``s`` is ``blocks[cuts[s]:cuts[s + 1]]``: contiguous, non-empty, with the
    cumulative cost cut as near as the blocks allow to ``s/num_stages`` of the total
    (a greedy pass: each cut moves right while that brings it closer to its target)."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"model_pipeline.num_stages: the model has {n} blocks, "
                         f"so it can be cut into 1..{n} stages, not {num_stages}")
    if any(c < 0 for c in costs):
        raise ValueError(f"block costs must be >= 0, got {list(costs)}")
    sizes = [float(c) for c in costs] if sum(costs) > 0 else [1.0] * n
    total = sum(sizes)
    cuts, start, running = [0], 0, 0.0
    for stage in range(num_stages - 1):
        target = total * (stage + 1) / num_stages
        end = start + 1  # every stage takes at least one block
        running += sizes[start]
        last_allowed = n - (num_stages - stage - 1)  # leave one block per later stage
        while end < last_allowed and abs(running + sizes[end] - target) < abs(running - target):
            running += sizes[end]
            end += 1
        cuts.append(end)
        start = end
    cuts.append(n)
    return cuts


from . import cnn, gpt, mlp, resnet, wav2vec2  # noqa: E402,F401  (registers the built-in models)
