"""From a config to modules and hosts: the model's blocks cut into stages with QAT
applied (:func:`build_model`), and a stage's host with its optimizers, DiLoCo state,
checkpoint writer and scalars (:func:`build_stage_host`).

The model is built whole (seeded, so every host gets the same weights), cut into stages,
and fake-quantized stage by stage with that stage's settings (``quant.stages.<s>``). The
full model and the stages share the same block objects, so the baseline, a pipeline stage
and an export all see the same layers, names and quantizers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Set

import torch
from torch import nn

from ..checkpoint import CheckpointWriter
from ..config import Config
from ..data import Task, make_task
from ..diloco import DiLoCo, build_optimizer
from ..models import build_blocks, split_blocks
from ..monitor.tensorboard import Scalars
from ..quant import QATSpec, prepare_qat, qat_param_groups, quantizable_layers, refresh_qparams
from .stage import StageHost, host_stage

log = logging.getLogger(__name__)

SKIP_FIRST, SKIP_LAST = "first", "last"


@dataclass
class BuiltModel:
    full: nn.Sequential
    stages: List[nn.Sequential]


def _resolve_skip(full: nn.Module, names: List[str]) -> Set[str]:
    """``quant.skip`` as layer names of the full model (``first``/``last`` resolved)."""
    layers = [fqn for fqn, _ in quantizable_layers(full)]
    resolved = set()
    for name in names:
        if name == SKIP_FIRST and layers:
            resolved.add(layers[0])
        elif name == SKIP_LAST and layers:
            resolved.add(layers[-1])
        elif name in layers:
            resolved.add(name)
        else:
            raise ValueError(f"quant.skip: {name!r} is not a quantizable layer of the model; "
                             f"expected 'first', 'last' or one of {layers}")
    return resolved


def _apply_qat(cfg: Config, full: nn.Sequential, offsets: List[int], num_blocks: int,
               forwards_per_step: int) -> None:
    q = cfg.quant
    skip = _resolve_skip(full, list(q.skip))
    bounds = offsets + [num_blocks]
    for stage in range(len(offsets)):
        sq = cfg.stage_quant(stage)
        if not sq.enable:
            continue
        # freeze_after is in inner steps; quantizers count training forwards
        freeze = None if q.freeze_after is None else q.freeze_after * forwards_per_step
        spec = QATSpec(weight_bits=sq.weight_bits, activation_bits=sq.activation_bits,
                       per_channel=q.per_channel, method=q.method, freeze_after=freeze,
                       averaging_constant=q.activation_averaging)
        lo, hi = bounds[stage], bounds[stage + 1]
        prepare_qat(full, spec, module_filter_fn=lambda m, fqn, lo=lo, hi=hi:
                    lo <= int(fqn.split(".")[0]) < hi and fqn not in skip)


def build_model(cfg: Config, task: Task, *, forwards_per_step: int = 1) -> BuiltModel:
    """The model of ``cfg`` for ``task`` (QAT applied where configured, its quantizers
    calibrated on one batch). ``forwards_per_step`` is how often a stage runs per inner
    step (the micro-batch count in a pipeline, 1 in the baseline)."""
    mp = cfg.model_pipeline
    blocks = build_blocks(mp.model, seed=cfg.seed, model_args=mp.model_args, **task.model_io())
    num_stages = 1 if cfg.mode == "baseline" else mp.num_stages
    groups = split_blocks(blocks, num_stages)
    offsets = [0]
    for group in groups[:-1]:
        offsets.append(offsets[-1] + len(group))
    full = nn.Sequential(*blocks)
    if cfg.quant.enable or any(cfg.stage_quant(s).enable for s in range(num_stages)):
        _apply_qat(cfg, full, offsets, len(blocks), forwards_per_step)
        _calibrate(full, task, cfg.diloco.batch_size_per_step)
    return BuiltModel(full, [nn.Sequential(*g) for g in groups])


@torch.no_grad()
def _calibrate(full: nn.Module, task: Task, batch_size: int) -> None:
    """One training-mode forward over a calibration batch, so that every quantizer has a
    range (and LSQ its initial step) before training starts. Every host computes the same
    values, and DiLoCo's global copy starts from them: without this, a replica's first
    outer step would pull the LSQ steps back towards their placeholder value."""
    x, _ = task.calibration_batch(batch_size)
    dtype = next(full.parameters()).dtype
    full(x.to(dtype))


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


def optimizer_groups(cfg: Config, module: nn.Module) -> List[dict]:
    """Parameter groups of the inner optimizer: LSQ steps get ``quant.scale_lr`` and no
    weight decay (an Adam-sized step can push an 8-bit scale through zero)."""
    lr = cfg.quant.scale_lr if cfg.quant.scale_lr is not None else cfg.diloco.inner_optim.lr
    return qat_param_groups(module, scale_lr=lr)


def build_stage_host(cfg: Config, *, stage: int, replica: int, group, state: Optional[dict],
                     device: torch.device, checkpoint_folders: Sequence[Path]) -> StageHost:
    """The host of ``stage`` of ``replica``, hosted (reachable by RPC) and ready to train:
    its module from ``state`` (a restored checkpoint, the same for every replica of the
    stage) or, on a fresh start, from the weights of the stage group's first rank."""
    built = build_model(cfg, make_task(cfg.data),
                        forwards_per_step=cfg.model_pipeline.num_microbatches)
    module = built.stages[stage].to(device=device, dtype=getattr(torch, cfg.dtype))
    diloco = DiLoCo(module, cfg.diloco.outer_optim, group,
                    wire_format=cfg.quant.wire.pseudo_grads, chunk_size=cfg.quant.wire.chunk_size,
                    after_sync=lambda: refresh_qparams(module))
    if state is not None:
        diloco.load_state(state)
    else:
        diloco.broadcast_initial()
    host = StageHost(
        stage, replica, module, device=device, diloco=diloco,
        optimizer=build_optimizer(optimizer_groups(cfg, module), cfg.diloco.inner_optim),
        rpc_timeout=cfg.comm.rpc_timeout, wire_format=cfg.quant.wire.activations,
        inner_steps=cfg.diloco.inner_steps,
        checkpoints=(CheckpointWriter(checkpoint_folders, stage, cfg.param_mirror.keep)
                     if checkpoint_folders else None),
        scalars=Scalars(cfg.run_path, f"stage{stage}-replica{replica}"))
    host_stage(host)
    log.info("hosting stage %d of replica %d (%d parameters)", stage, replica,
             sum(p.numel() for p in module.parameters()))
    return host
