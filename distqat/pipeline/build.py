"""From a config to modules and hosts: the model's stages with QAT applied
(:func:`build_stages`), and a stage's host with its optimizers, DiLoCo state, checkpoint
writer and scalars (:func:`build_stage_host`).

A worker builds only its own stage's blocks (``distqat.models.build_blocks`` seeds each
block on its own, so a stage built alone equals the same blocks of ``.full``). Stages are
contiguous runs of blocks cut by compute (``block_costs``), and each is fake-quantized with
its own settings (``quant.stages.<s>``), using the full model's layer names so that
``quant.skip`` means the same layers in the pipeline, the baseline and an export.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import torch
from torch import nn

from ..checkpoint import CheckpointWriter
from ..config import Config
from ..data import make_objective
from ..diloco import ALLGATHER_CHUNK_BYTES, build_optimizer
from ..fileio import read_json, write_json
from ..models import block_costs, build_blocks, cut_points, meta_blocks
from ..monitor.tensorboard import Scalars
from ..quant import QATSpec, prepare_qat, qat_param_groups, quantizable_layers, refresh_qparams
from ..streaming import make_diloco
from .stage import StageHost, host_stage

log = logging.getLogger(__name__)

SKIP_FIRST, SKIP_LAST = "first", "last"
IO_FILE = "model_io.json"  # what the task told the model builder, saved beside a run
CUTS_FILE = "stage_cuts.json"  # the stages' block boundaries, kept beside a run


def stage_cuts(cfg: Config, io: Mapping[str, Any]) -> List[int]:
    """Block boundaries of the stages: stage ``s`` is ``blocks[cuts[s]:cuts[s+1]]``."""
    mp = cfg.model_pipeline
    num_stages = 1 if cfg.mode == "baseline" else mp.num_stages
    if num_stages == 1:  # nothing to balance: no need to count
        return [0, len(meta_blocks(mp.model, io=io, model_args=mp.model_args))]
    return cut_points(block_costs(mp.model, io=io, model_args=mp.model_args), num_stages)


def kept_stage_cuts(cfg: Config, io: Mapping[str, Any]) -> List[int]:
    """:func:`stage_cuts`, kept in the run folder for the same model, arguments, data
    shape and stage count. Counting FLOPs runs the model under torch's FlopCounterMode,
    which imports torch._dynamo (~1 s of CPU); a restarted round reads the cuts instead."""
    mp = cfg.model_pipeline
    key = json.loads(json.dumps({"model": mp.model, "model_args": dict(mp.model_args),
                                 "io": dict(io), "num_stages": mp.num_stages,
                                 "mode": cfg.mode}, default=str))
    path = cfg.run_path / CUTS_FILE
    kept = read_json(path)
    if isinstance(kept, dict) and kept.get("key") == key:
        return list(kept["cuts"])
    cuts = stage_cuts(cfg, io)
    write_json(path, {"key": key, "cuts": cuts}, durable=False)
    return cuts


def _resolve_skip(full_layers: List[str], names: Sequence[str]) -> Set[str]:
    """``quant.skip`` as layer names of the full model (``first``/``last`` resolved)."""
    resolved = set()
    for name in names:
        if name == SKIP_FIRST and full_layers:
            resolved.add(full_layers[0])
        elif name == SKIP_LAST and full_layers:
            resolved.add(full_layers[-1])
        elif name in full_layers:
            resolved.add(name)
        else:
            raise ValueError(f"quant.skip: {name!r} is not a quantizable layer of the model; "
                             f"expected 'first', 'last' or one of {full_layers}")
    return resolved


def _apply_qat(cfg: Config, io: Mapping[str, Any], stage: int, first_block: int,
               module: nn.Sequential, forwards_per_step: int) -> None:
    q, mp = cfg.quant, cfg.model_pipeline
    sq = cfg.stage_quant(stage)
    full = nn.Sequential(*meta_blocks(mp.model, io=io, model_args=mp.model_args))
    skip = _resolve_skip([fqn for fqn, _ in quantizable_layers(full)], list(q.skip))
    # freeze_after is in inner steps; quantizers count training forwards
    freeze = None if q.freeze_after is None else q.freeze_after * forwards_per_step
    spec = QATSpec(weight_bits=sq.weight_bits, activation_bits=sq.activation_bits,
                   per_channel=q.per_channel, method=q.method, freeze_after=freeze,
                   averaging_constant=q.activation_averaging)

    def full_name(fqn: str) -> str:  # a stage numbers its blocks from 0
        head, _, rest = fqn.partition(".")
        return f"{int(head) + first_block}.{rest}" if rest else str(int(head) + first_block)

    prepare_qat(module, spec, module_filter_fn=lambda m, fqn: full_name(fqn) not in skip)


def uses_qat(cfg: Config) -> bool:
    """Whether any stage is fake-quantized (then a fresh start calibrates first)."""
    stages = 1 if cfg.mode == "baseline" else cfg.model_pipeline.num_stages
    return any(cfg.stage_quant(s).enable for s in range(stages))


def build_stages(cfg: Config, io: Mapping[str, Any], stages: Optional[Sequence[int]] = None,
                 *, forwards_per_step: int = 1,
                 cuts: Optional[Sequence[int]] = None) -> Dict[int, nn.Sequential]:
    """Stages ``stages`` (default: all) of the model of ``cfg``, QAT applied where
    configured (quantizers not yet calibrated: a first training-mode forward sets their
    ranges). In baseline mode
    the one stage is the whole model. ``forwards_per_step`` is how often a stage runs per
    inner step (the micro-batch count in a pipeline, 1 in the baseline); ``cuts``: the
    stages' boundaries when known (default: :func:`stage_cuts`)."""
    mp = cfg.model_pipeline
    cuts = stage_cuts(cfg, io) if cuts is None else cuts
    wanted = range(len(cuts) - 1) if stages is None else stages
    built = {}
    for s in wanted:
        blocks = build_blocks(mp.model, io=io, seed=cfg.seed, model_args=mp.model_args,
                              blocks=range(cuts[s], cuts[s + 1]))
        module = nn.Sequential(*blocks)
        if cfg.stage_quant(s).enable:
            _apply_qat(cfg, io, s, cuts[s], module, forwards_per_step)
        built[s] = module
    return built


def build_full(cfg: Config, io: Mapping[str, Any], *, forwards_per_step: int = 1) -> nn.Sequential:
    """The whole model as one module, each stage's QAT settings applied to its blocks:
    what a pipeline's stages compose to (the single-process twin, the export)."""
    stages = build_stages(cfg, io, forwards_per_step=forwards_per_step)
    return nn.Sequential(*[block for s in sorted(stages) for block in stages[s]])


def optimizer_groups(cfg: Config, module: nn.Module) -> List[dict]:
    """Parameter groups of the inner optimizer: LSQ steps get ``quant.scale_lr`` and no
    weight decay (an Adam-sized step can push an 8-bit scale through zero)."""
    lr = cfg.quant.scale_lr if cfg.quant.scale_lr is not None else cfg.diloco.inner_optim.lr
    return qat_param_groups(module, scale_lr=lr)


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``device`` of the config on this worker: ``auto`` takes the GPU of the local rank
    where there is one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def build_stage_host(cfg: Config, *, stage: int, replica: int, io: Mapping[str, Any], group,
                     state: Optional[dict], device: torch.device,
                     checkpoint_folders: Sequence[Path],
                     cuts: Optional[Sequence[int]] = None) -> StageHost:
    """The host of ``stage`` of ``replica``, hosted (reachable by RPC) and ready to train:
    its module from ``state`` (a restored checkpoint, the same for every replica of the
    stage) or, on a fresh start, from the weights of the stage group's first rank (then
    the driver calibrates the quantizers through the pipeline before the first step)."""
    mp = cfg.model_pipeline
    module = build_stages(cfg, io, [stage], forwards_per_step=mp.num_microbatches,
                          cuts=cuts)[stage]
    module = module.to(device=device, dtype=getattr(torch, cfg.dtype))
    diloco = make_diloco(module, cfg.diloco, group, wire_format=cfg.quant.wire.pseudo_grads,
                         chunk_size=cfg.quant.wire.chunk_size,
                         after_sync=lambda: refresh_qparams(module))
    if state is not None:
        diloco.load_state(state)
    else:
        diloco.broadcast_initial()
    diloco.probe_link()
    if diloco.piece_bytes != ALLGATHER_CHUNK_BYTES:
        log.info("stage %d: the 2-replica all-gather goes in pieces of %d kB (probe_link)",
                 stage, diloco.piece_bytes // 1024)
    host = StageHost(
        stage, replica, module, device=device, diloco=diloco,
        optimizer=build_optimizer(optimizer_groups(cfg, module), cfg.diloco.inner_optim),
        objective=make_objective(cfg.data) if stage == mp.num_stages - 1 else None,
        rpc_timeout=cfg.comm.rpc_timeout, wire_format=cfg.quant.wire.activations,
        inner_steps=cfg.diloco.inner_steps, precision=cfg.precision,
        checkpoints=(CheckpointWriter(checkpoint_folders, stage, cfg.param_mirror.keep)
                     if checkpoint_folders else None),
        scalars=Scalars(cfg.run_path, f"stage{stage}-replica{replica}"))
    if state is not None:
        host.counters_base.update(state.get("counters", {}))
        host.data_positions = dict(state.get("data_positions", {}))
    host_stage(host)
    log.info("hosting stage %d of replica %d (%d parameters)", stage, replica,
             sum(p.numel() for p in module.parameters()))
    return host
