"""The driver's own costs, measured by ``--profile`` (:mod:`distqat.stage_profile`).

What the stages' own times leave out, and :mod:`distqat.plan_cost` charges as ``delta``
(per inner step), ``mu`` (per RPC message) and ``gamma`` (per collective call):

* ``driver_s``: the real ``PipelineDriver.train_step`` on a one-stage chain of the whole
  model (``num_microbatches`` as configured) less the same module's forwards, weighted
  losses, distributed backward and step done directly.
* ``rpc_s``: with several stages, the real pipeline, every stage hosted in this process
  and reached through its own TensorPipe agent over loopback (serialising, the transport,
  dispatch to an RPC thread, distributed autograd's bookkeeping, the answer): its
  ``train_step`` under gpipe less the same stages' work done directly, less ``driver_s``
  and the hops' bytes at :data:`distqat.plan_cost.LOCAL`, over the messages the model
  charges per inner step (``4 (S-1) + 2``). With one stage (no hop to charge), half the
  round trip of a small ``rpc_sync``.
* ``collective_s``: one collective call's own cost (posting it, gloo's thread taking it,
  the ranks' handshake, the wait): the median time of a one-element ``all_gather`` among
  ``max(2, concurrent)`` processes of this machine over loopback (:func:`collective_call_s`,
  in processes of their own after the others: it needs a group).

``driver_s`` and ``rpc_s`` are small differences of two times of ~10 ms on shared cores,
so they are taken in pairs, one right after the other (the machine's load drifts between
pairs, hardly within one), and the median pair's difference is kept (at least 0); they run
in the profiling process: RPC up as ``profile``, a world of one.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import Config
from .stage_profile import _inputs, _median_times, _targets


def paired_difference(first: Callable[[], Any], second: Callable[[], Any], pairs: int) -> float:
    """Median over ``pairs`` of (seconds of ``second()`` - seconds of ``first()``), each
    pair run back to back after one warm-up of each; at least 0."""
    first()
    second()
    diffs = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        diffs.append(time.perf_counter() - t1 - (t1 - t0))
    return max(0.0, statistics.median(diffs))


def pairs(repeats: int) -> int:
    """Pairs per difference: the profile's ``repeats``, at least 20 (each ~10 ms here)."""
    return max(20, 4 * repeats)


def rpc_message_s(repeats: int) -> float:
    """One RPC message's own cost: half the median round trip of a small ``rpc_sync``
    through this process's agent (``profile``, over loopback TCP)."""
    import torch
    import torch.distributed.rpc as rpc

    small = torch.zeros(4)

    def once():
        t0 = time.perf_counter()
        rpc.rpc_sync("profile", torch.add, args=(small, 1))
        return (time.perf_counter() - t0,)
    return _median_times(once, pairs(repeats))[0] / 2


def driver_s(cfg: Config, io: Mapping[str, Any], objective, dtype, repeats: int) -> float:
    """The driver's own work per inner step: the real ``PipelineDriver.train_step`` on a
    one-stage chain of the whole model (``num_microbatches`` as configured) less the same
    work done directly (forwards, weighted losses, one distributed backward, the step),
    in pairs (:func:`paired_difference`)."""
    import torch
    import torch.distributed.autograd as dist_autograd

    from .diloco import DiLoCo, build_optimizer
    from .pipeline.build import build_full, optimizer_groups
    from .pipeline.driver import PipelineDriver, split
    from .pipeline.stage import StageHost

    mp, batch = cfg.model_pipeline, cfg.diloco.batch_size_per_step
    module = build_full(cfg, io, forwards_per_step=mp.num_microbatches).to(dtype)
    opt = build_optimizer(optimizer_groups(cfg, module), cfg.diloco.inner_optim)
    host = StageHost(0, 0, module, optimizer=opt, device=torch.device("cpu"),
                     diloco=DiLoCo(module, cfg.diloco.outer_optim, None), objective=objective)
    driver = PipelineDriver(host, [], objective=objective, num_microbatches=mp.num_microbatches,
                            rpc_timeout=60.0, dtype=dtype)
    x, y = _inputs(io, batch, None, dtype), _targets(io, batch)
    params = [p for p in module.parameters() if p.requires_grad]

    def direct():
        micro = split(objective.prepare_input(x, dtype), y, mp.num_microbatches)
        with dist_autograd.context() as context_id:
            loss = sum(objective.loss(module(xm), ym) * (len(xm) / batch) for xm, ym in micro)
            dist_autograd.backward(context_id, [loss])
            grads = dist_autograd.get_gradients(context_id)
            for p in params:
                p.grad = grads.get(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return paired_difference(direct, lambda: driver.train_step(x, y), pairs(repeats))


def chain_message_s(cfg: Config, io: Mapping[str, Any], job: Mapping[str, Any], objective,
                     dtype, driver_s: float) -> float:
    """One RPC message's own cost from the real pipeline on loopback (module docstring)."""
    import torch
    import torch.distributed.autograd as dist_autograd

    from .diloco import DiLoCo, build_optimizer
    from .pipeline.build import build_stages, optimizer_groups
    from .pipeline.driver import PipelineDriver, split
    from .pipeline.stage import StageHost, host_stage, stage_rref, unhost_all
    from .plan_cost import LOCAL
    from .stage_times import wire_bytes

    mp, batch, S = cfg.model_pipeline, cfg.diloco.batch_size_per_step, cfg.model_pipeline.num_stages
    mods = build_stages(cfg, io, forwards_per_step=mp.num_microbatches, cuts=job["cuts"])
    hosts = []
    for s in range(S):
        module = mods[s].to(dtype)
        opt = build_optimizer(optimizer_groups(cfg, module), cfg.diloco.inner_optim)
        hosts.append(StageHost(s, 0, module, optimizer=opt, device=torch.device("cpu"),
                               diloco=DiLoCo(module, cfg.diloco.outer_optim, None),
                               objective=objective if s == S - 1 else None, rpc_timeout=60.0,
                               wire_format=cfg.quant.wire.activations))
        host_stage(hosts[-1])
    try:
        rrefs = [stage_rref("profile", s, 60.0) for s in range(1, S)]
        for s in range(1, S - 1):
            hosts[s].connect_next(rrefs[s])
        driver = PipelineDriver(hosts[0], rrefs, objective=objective, dtype=dtype,
                                num_microbatches=mp.num_microbatches, rpc_timeout=60.0,
                                schedule="gpipe")
        x, y = _inputs(io, batch, None, dtype), _targets(io, batch)

        def direct():
            micro = split(objective.prepare_input(x, dtype), y, mp.num_microbatches)
            with dist_autograd.context() as context_id:
                losses = []
                for xm, ym in micro:
                    for h in hosts:
                        xm = h.module(xm)
                    losses.append(objective.loss(xm, ym) * (len(ym) / batch))
                dist_autograd.backward(context_id, [sum(losses)])
                grads = dist_autograd.get_gradients(context_id)
                for h in hosts:
                    for p in h.module.parameters():
                        p.grad = grads.get(p)
                    h.optimizer.step()
                    h.optimizer.zero_grad(set_to_none=True)
        diff = paired_difference(direct, lambda: driver.train_step(x, y), pairs(job["repeats"]))
    finally:
        unhost_all()
    fmt, e = cfg.quant.wire.activations, 8 if cfg.dtype == "float64" else 4
    hop_bytes = sum(2 * wire_bytes(shape, fmt, e) for shape in job["out_shapes"][:-1])
    local = mp.num_microbatches * hop_bytes / LOCAL.beta
    return max(0.0, diff - driver_s - local) / (4 * (S - 1) + 2)


def collective_call_s(rank: int, world: int, store_dir: str, repeats: int) -> float:
    """Median seconds of a one-element gloo ``all_gather`` among ``world`` processes
    (this one is ``rank``), joined through a file store in ``store_dir``."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    store = dist.FileStore(str(Path(store_dir) / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        one = torch.zeros(1)
        outs = [torch.empty(1) for _ in range(world)]

        def once():
            t0 = time.perf_counter()
            dist.all_gather(outs, one)
            return (time.perf_counter() - t0,)
        dist.barrier()
        return _median_times(once, 4 * pairs(repeats))[0]
    finally:
        dist.destroy_process_group()
