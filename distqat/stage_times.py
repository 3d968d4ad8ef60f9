"""A model's costs as ``distqat.simulate`` needs them, taken from the model itself.

:func:`model_facts` reads sizes with the project's own builders, on the meta device (no
memory): the stage cuts (``cut_points`` over ``block_costs``, as a run cuts them), each
stage's trainable parameters and buffers (what DiLoCo averages), its output's shape for
one micro-batch (what crosses a stage boundary), the targets' bytes (they travel with the
activation to the last stage), its forward FLOPs per sample, and the whole model's
parameters in order with the share of the backward done when each gradient is ready
(DDP's buckets).

:func:`profile` measures this machine: each stage built by ``build_stages`` (QAT as
configured), forward, backward and inner optimizer step on one micro-batch with the
worker's thread count; one replica's outer step alone (``DiLoCo`` with no group) and the
decoding of one peer's payload, in every wire format; and the whole model at the full
batch (for DDP). Medians of ``repeats`` after one warm-up. The result is kept in the run
folder (``stage_times.json``) under a key of everything it depends on, so the simulator
reads it back instead of measuring again (:func:`load_profile`).

:func:`device_times` is the other source: times from FLOPs at a given rate (forward
FLOPs / rate, backward twice that; optimizer and outer step from memory traffic where a
memory bandwidth is known, else nothing): a GPU fleet cannot be profiled on this CPU.
"""

from __future__ import annotations

import logging
import math
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .config import Config
from .fileio import read_json, write_json

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
    int_buffers: int
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
                int_buffers=sum(t.numel() for t in bufs if not t.is_floating_point()),
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
           "torch": torch.__version__}
    return json.loads(json.dumps(key, default=str))


def load_profile(cfg: Config, key: Mapping[str, Any]) -> Optional[dict]:
    kept = read_json(cfg.run_path / PROFILE_FILE)
    return kept if isinstance(kept, dict) and kept.get("key") == key else None


def _median_times(fn, repeats: int) -> List[float]:
    fn()  # warm-up: allocator, thread pools, lazy quantizer buffers
    runs = [fn() for _ in range(repeats)]
    return [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]


def _inputs(cfg: Config, io: Mapping[str, Any], batch: int, shape: Optional[Sequence[int]]):
    import torch

    if shape is not None:  # a later stage: the previous stage's output, carrying a gradient
        return torch.randn(*shape).requires_grad_(True)
    if "vocab_size" in io:
        return torch.randint(0, int(io["vocab_size"]), (batch, int(io["seq_len"])))
    return torch.randn(batch, *[int(d) for d in io["input_shape"]])


def _targets(io: Mapping[str, Any], batch: int):
    import torch

    if "vocab_size" in io:
        return torch.randint(0, int(io["vocab_size"]), (batch, int(io["seq_len"])))
    return torch.randint(0, int(io["num_classes"]), (batch,))


def _train_times(module, x, y, objective, optimizer, last: bool, fmt: str,
                 repeats: int) -> List[float]:
    """Median (forward, backward, step) seconds; the activation's wire coding (encode on
    the sender, decode on the receiver, both ways) is counted in forward and backward."""
    import torch

    from .quant import wire

    def once():
        t0 = time.perf_counter()
        out = module(x)
        if last:
            out = objective.loss(out, y)
        elif fmt != "fp32":
            wire.decode(wire.encode(out.detach(), fmt))
        t1 = time.perf_counter()
        if last:
            out.backward()
        else:
            grad = torch.ones_like(out)
            if fmt != "fp32":
                grad = wire.decode(wire.encode(grad, fmt))
            out.backward(grad)
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2
    return _median_times(once, repeats)


def _outer_times(cfg: Config, module, repeats: int) -> Dict[str, Dict[str, float]]:
    """One replica's outer step alone, and decoding one peer's payload, per wire format."""
    import torch

    from .diloco import DiLoCo
    from .quant import wire

    out: Dict[str, Dict[str, float]] = {}
    chunk = cfg.quant.wire.chunk_size
    for fmt in WIRE_FORMATS:
        diloco = DiLoCo(module, cfg.diloco.outer_optim, None, wire_format=fmt, chunk_size=chunk)

        def outer():
            with torch.no_grad():
                for p in diloco.params:
                    p.add_(1e-4)
            t0 = time.perf_counter()
            diloco.outer_step()
            return (time.perf_counter() - t0,)
        flat = torch.cat([p.detach().reshape(-1) for p in diloco.params])
        payload = wire.encode(flat, fmt, chunk_size=chunk if fmt == "int8" else None)

        def decode():
            t0 = time.perf_counter()
            wire.decode(payload)
            return (time.perf_counter() - t0,)
        out[fmt] = {"outer_local_s": _median_times(outer, repeats)[0],
                    "decode_s": 0.0 if fmt == "fp32" else _median_times(decode, repeats)[0]}
    return out


def profile(cfg: Config, io: Mapping[str, Any], facts: ModelFacts, *, repeats: int = 3,
            key: Optional[Mapping[str, Any]] = None) -> dict:
    """Measure every stage and the whole model here; keep the result in the run folder."""
    import torch

    from .data import make_objective
    from .diloco import build_optimizer
    from .pipeline.build import build_full, build_stages, optimizer_groups

    threads = cfg.comm.threads_per_worker
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)  # as a worker runs
    objective = make_objective(cfg.data)
    dtype = getattr(torch, cfg.dtype)
    mp = cfg.model_pipeline
    result: Dict[str, Any] = {"key": dict(key or profile_key(cfg, io, facts)), "stages": [],
                              "threads": torch.get_num_threads(), "repeats": repeats}
    try:
        stages = build_stages(cfg, io, forwards_per_step=mp.num_microbatches, cuts=facts.cuts)
        for s in range(mp.num_stages):
            module = stages.pop(s).to(dtype)
            last = s == mp.num_stages - 1
            x = _inputs(cfg, io, facts.microbatch, facts.stages[s - 1].out_shape if s else None)
            x = x.to(dtype) if x.is_floating_point() else x
            opt = build_optimizer(optimizer_groups(cfg, module), cfg.diloco.inner_optim)
            fwd, bwd, step = _train_times(module, x, _targets(io, facts.microbatch), objective,
                                          opt, last, cfg.quant.wire.activations, repeats)
            result["stages"].append({"fwd_s": fwd, "bwd_s": bwd, "step_s": step,
                                     "outer": _outer_times(cfg, module, repeats)})
            log.info("stage %d: forward %.4f s, backward %.4f s, step %.4f s per micro-batch "
                     "of %d", s, fwd, bwd, step, facts.microbatch)
            del module, opt
        full = build_full(cfg, io).to(dtype)
        batch = cfg.diloco.batch_size_per_step
        x = _inputs(cfg, io, batch, None)
        x = x.to(dtype) if x.is_floating_point() else x
        opt = build_optimizer(optimizer_groups(cfg, full), cfg.diloco.inner_optim)
        fwd, bwd, step = _train_times(full, x, _targets(io, batch), objective, opt, True,
                                      "fp32", repeats)
        result["full"] = {"fwd_s": fwd, "bwd_s": bwd, "step_s": step}
    finally:
        torch.set_num_threads(before)
    write_json(cfg.run_path / PROFILE_FILE, result, durable=False)
    return result


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
