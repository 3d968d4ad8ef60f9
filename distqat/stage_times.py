"""A model's costs as ``distqat.simulate`` needs them, taken from the model itself.

:func:`model_facts` reads sizes with the project's own builders, on the meta device (no
memory): the stage cuts (``cut_points`` over ``block_costs``, as a run cuts them), each
stage's trainable parameters and buffers (what DiLoCo averages), its output's shape for
one micro-batch (what crosses a stage boundary), the targets' bytes (they travel with the
activation to the last stage), its forward FLOPs per sample, and the whole model's
parameters in order with the share of the backward done when each gradient is ready
(DDP's buckets).

:func:`distqat.stage_profile.profile` measures the times on this machine and keeps them
in the run folder (``stage_times.json``) under :func:`profile_key`, everything they depend
on, so the simulator reads them back (:func:`load_profile`) instead of measuring again.

:func:`device_times` is the other source: times from FLOPs at a given rate (forward
FLOPs / rate, backward twice that; optimizer and outer step from memory traffic where a
memory bandwidth is known, else nothing): a GPU fleet cannot be profiled on this CPU.
"""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .config import Config
from .fileio import read_json

log = logging.getLogger(__name__)

PROFILE_FILE = "stage_times.json"
WIRE_FORMATS = ("fp32", "bf16", "int8")
# peak dense bf16/fp16 tensor FLOP/s and memory bytes/s of a few devices (vendor sheets)
DEVICES: Dict[str, Tuple[float, float]] = {
    "h100": (989e12, 3.35e12),  # H100 SXM
    "a100": (312e12, 2.04e12),  # A100 80 GB SXM
    "l4": (121e12, 0.30e12),
    "v100": (125e12, 0.90e12),
    "t4": (65e12, 0.32e12),
}
ADAMW_BYTES = 28  # per parameter: read p, g, m, v; write p, m, v (fp32)
OUTER_BYTES = 40  # per parameter: delta, flatten, encode/decode, outer SGD, copy back


@dataclass
class StageFacts:
    blocks: Tuple[int, int]
    params: int
    float_buffers: int
    int_buffer_bytes: int
    flops: float  # forward, per sample
    out_shape: Tuple[int, ...]  # for one micro-batch (empty for the last stage)


@dataclass
class ModelFacts:
    cuts: List[int]
    stages: List[StageFacts]
    microbatch: int  # samples per micro-batch (the largest, as run's split makes them)
    target_bytes: int  # per micro-batch
    element_bytes: int
    full_params: List[Tuple[int, float]]  # (elements, share of the backward done) in order

    @property
    def params(self) -> int:
        return sum(s.params for s in self.stages)


def microbatch_size(cfg: Config) -> int:
    return math.ceil(cfg.diloco.batch_size_per_step / cfg.model_pipeline.num_microbatches)


def model_facts(cfg: Config, io: Mapping[str, Any]) -> ModelFacts:
    import torch

    from .models import block_costs, cut_points, meta_blocks, sample_input

    mp = cfg.model_pipeline
    costs = block_costs(mp.model, io=io, model_args=mp.model_args)
    cuts = cut_points(costs, mp.num_stages)
    blocks = meta_blocks(mp.model, io=io, model_args=mp.model_args)
    b = microbatch_size(cfg)
    x = sample_input(io, batch=b, device="meta")
    stages = []
    with torch.no_grad():
        for s in range(mp.num_stages):
            mods = blocks[cuts[s]:cuts[s + 1]]
            for m in mods:
                m.eval()
                x = m(x)
            params = sum(p.numel() for m in mods for p in m.parameters() if p.requires_grad)
            bufs = [t for m in mods for t in m.buffers()]
            stages.append(StageFacts(
                blocks=(cuts[s], cuts[s + 1]), params=params,
                float_buffers=sum(t.numel() for t in bufs if t.is_floating_point()),
                int_buffer_bytes=sum(t.numel() * t.element_size() for t in bufs
                                     if not t.is_floating_point()),
                flops=float(sum(costs[cuts[s]:cuts[s + 1]])),
                out_shape=tuple(x.shape) if s < mp.num_stages - 1 else ()))
    # the targets: token ids (B, T) for a language model, one label per sample otherwise
    target = b * int(io["seq_len"]) * 8 if "vocab_size" in io else b * 8
    total = sum(costs) or 1.0
    done_after = [sum(costs[i:]) / total for i in range(len(costs))]  # backward runs last->first
    full = [(p.numel(), done_after[i]) for i, m in enumerate(blocks)
            for p in m.parameters() if p.requires_grad]
    return ModelFacts(cuts, stages, b, target, 8 if cfg.dtype == "float64" else 4, full)


def wire_bytes(shape: Sequence[int], fmt: str, element_bytes: int) -> float:
    """What ``distqat.quant.wire`` / ``pipeline.hop`` send for one tensor of ``shape``:
    fp32 as is, bf16 2 bytes, int8 1 byte plus a float32 scale per row (dim 0)."""
    if not shape:
        return 0.0
    numel = math.prod(shape)
    if fmt == "fp32":
        return float(numel * element_bytes)
    if fmt == "bf16":
        return 2.0 * numel
    rows = shape[0] if len(shape) >= 2 else 1
    return float(numel + 4 * rows)


# ---------------------------------------------------------------- measured on this machine

def profile_key(cfg: Config, io: Mapping[str, Any], facts: ModelFacts) -> Dict[str, Any]:
    """Everything the measured times depend on (a different key: measure again)."""
    import json

    import torch

    mp, q = cfg.model_pipeline, cfg.quant
    key = {"model": mp.model, "model_args": dict(mp.model_args), "io": dict(io),
           "cuts": facts.cuts, "microbatch": facts.microbatch,
           "batch": cfg.diloco.batch_size_per_step, "dtype": cfg.dtype,
           "threads": cfg.comm.threads_per_worker, "inner_optim": cfg.diloco.inner_optim.name,
           "quant": [cfg.stage_quant(s).__dict__ for s in range(mp.num_stages)],
           "quant_method": q.method, "activations": q.wire.activations,
           "chunk_size": q.wire.chunk_size, "host": socket.gethostname(),
           "torch": torch.__version__,
           "measures": 4}  # 4: with the steps' sd_s (older files: measure again)
    return json.loads(json.dumps(key, default=str))


def load_profile(cfg: Config, key: Mapping[str, Any]) -> Optional[dict]:
    kept = read_json(cfg.run_path / PROFILE_FILE)
    return kept if isinstance(kept, dict) and kept.get("key") == key else None


def device_times(facts: ModelFacts, batch: int, flops: float,
                 membw: Optional[float] = None) -> dict:
    """Times in :func:`profile`'s layout from FLOPs at ``flops`` FLOP/s (and memory
    traffic at ``membw`` bytes/s, if given; else optimizer and outer steps cost 0)."""
    mem = (lambda nbytes: nbytes / membw) if membw else (lambda nbytes: 0.0)
    stages = []
    for st in facts.stages:
        fwd = st.flops * facts.microbatch / flops
        outer = {fmt: {"outer_local_s": mem(OUTER_BYTES * st.params),
                       "decode_s": 0.0 if fmt == "fp32" else mem(5 * st.params)}
                 for fmt in WIRE_FORMATS}
        stages.append({"fwd_s": fwd, "bwd_s": 2 * fwd, "step_s": mem(ADAMW_BYTES * st.params),
                       "outer": outer})
    fwd = sum(st.flops for st in facts.stages) * batch / flops
    return {"stages": stages, "full": {"fwd_s": fwd, "bwd_s": 2 * fwd,
                                       "step_s": mem(ADAMW_BYTES * facts.params)}}

