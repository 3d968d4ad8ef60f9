"""Stage times measured on this machine, the way a worker computes (``--profile``).

:func:`profile` starts fresh processes (``python -m distqat.stage_profile``, each bounded
by a timeout and ended by its PID) that run as a worker does: its thread count
(``comm.threads_per_worker``), RPC up (a world of one), distributed autograd. In each:
every stage built by ``build_stages`` (QAT as configured) runs forward, backward and its
inner optimizer step on one micro-batch inside a distributed-autograd context (the
activation's wire coding counted both ways); one replica's outer step alone (``DiLoCo``
with no group) and the decoding of one peer's payload, in every wire format; the whole
model at the full batch with plain autograd (a DDP replica); the driver's own work per
inner step (``driver_s``: the real ``PipelineDriver.train_step`` on a one-stage chain of
the whole model, less the same module's forwards, backward and step done directly, in
pairs, the median difference); one RPC message's own cost (``rpc_s``); and, in processes
of their own that form a gloo group, one collective call's own cost (``collective_s``),
all three in :mod:`distqat.driver_profile`.
Medians of ``repeats`` after one warm-up (the stages and the whole model also keep the
standard deviation of a micro-batch's forward + backward + step, ``sd_s``, over more
calls, for up to :data:`JITTER_SECONDS`: the jitter that makes replicas wait for each
other). Several processes at once (``concurrent``)
measure what each of several "hosts" sharing this machine's cores gets (the namespace
testbed of ``bench/simulate_check.py``): they start measuring together (a barrier on
files: their start-up takes seconds, the measurements milliseconds, so without it they
overlapped by chance); their element-wise median is kept in the run folder
(``distqat.stage_times.PROFILE_FILE``), keyed by ``stage_times.profile_key``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .config import Config
from .fileio import write_json
from .stage_times import PROFILE_FILE, WIRE_FORMATS, ModelFacts, profile_key

log = logging.getLogger(__name__)

PROFILE_TIMEOUT = 1800.0  # seconds for one profiling process (GPT-Neo on 2 CPU cores: minutes)
BARRIER_TIMEOUT = 300.0  # seconds concurrent profiling processes wait for each other
# a step's jitter wants more samples than its median: small stages are sampled this long
JITTER_SECONDS = 1.0
JITTER_MAX_SAMPLES = 500


def _sample(fn, repeats: int, seconds: float = 0.0) -> Tuple[List[float], float]:
    """``fn()``'s figures, median of each over ``repeats`` calls after one warm-up; and the
    standard deviation of their sum (a step's jitter: stragglers, ``plan_cost``) over
    those and more while ``seconds`` last (at most :data:`JITTER_MAX_SAMPLES`). The
    medians stay those of the first ``repeats``, the estimator every check so far used
    (BENCHMARKS.md): the extra calls serve the spread only."""
    fn()  # warm-up: allocator, thread pools, lazy quantizer buffers
    runs = []
    end = time.perf_counter() + seconds
    while len(runs) < repeats or (time.perf_counter() < end
                                  and len(runs) < JITTER_MAX_SAMPLES):
        runs.append(fn())
    sd = statistics.stdev(sum(r) for r in runs) if len(runs) > 1 else 0.0
    return [statistics.median(r[i] for r in runs[:repeats]) for i in range(len(runs[0]))], sd


def _median_times(fn, repeats: int) -> List[float]:
    return _sample(fn, repeats)[0]


def _inputs(io: Mapping[str, Any], batch: int, shape: Optional[Sequence[int]], dtype):
    import torch

    if shape:  # a later stage: the previous stage's output, carrying a gradient
        return torch.randn(*shape, dtype=dtype).requires_grad_(True)
    if "vocab_size" in io:
        return torch.randint(0, int(io["vocab_size"]), (batch, int(io["seq_len"])))
    return torch.randn(batch, *[int(d) for d in io["input_shape"]], dtype=dtype)


def _targets(io: Mapping[str, Any], batch: int):
    import torch

    if "vocab_size" in io:
        return torch.randint(0, int(io["vocab_size"]), (batch, int(io["seq_len"])))
    return torch.randint(0, int(io["num_classes"]), (batch,))


def _stage_times(module, x, y, objective, optimizer, last: bool, fmt: str,
                 repeats: int) -> Tuple[List[float], float]:
    """Median (forward, backward, step) seconds of one micro-batch the way a worker runs
    it, and their sum's standard deviation: in a distributed-autograd context, backward by
    ``dist_autograd.backward``, the step with the context's gradients; the activation's
    wire coding (encode on the sender, decode on the receiver, both ways) is counted in
    forward and backward."""
    import torch
    import torch.distributed.autograd as dist_autograd

    from .quant import wire

    params = [p for p in module.parameters() if p.requires_grad]

    def once():
        with dist_autograd.context() as context_id:
            t0 = time.perf_counter()
            out = module(x)
            if last:
                root = objective.loss(out, y)
            else:
                if fmt != "fp32":
                    wire.decode(wire.encode(out.detach(), fmt))
                grad = torch.ones_like(out)
                if fmt != "fp32":
                    grad = wire.decode(wire.encode(grad, fmt))
                root = (out * grad).sum()
            t1 = time.perf_counter()
            dist_autograd.backward(context_id, [root])
            t2 = time.perf_counter()
            grads = dist_autograd.get_gradients(context_id)
            for p in params:
                p.grad = grads.get(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2
    return _sample(once, repeats, JITTER_SECONDS)


def _full_times(module, x, y, objective, optimizer,
                repeats: int) -> Tuple[List[float], float]:
    """The whole model with plain autograd, as a DDP replica computes (hooks aside)."""
    def once():
        t0 = time.perf_counter()
        loss = objective.loss(module(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2
    return _sample(once, repeats, JITTER_SECONDS)


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


def _barrier(job: Mapping[str, Any]) -> None:
    """Wait until every concurrent profiling process is here (a file each in the job's
    folder), so that they measure at the same time, sharing the cores as hosts do."""
    folder, n = job.get("barrier"), job.get("concurrent", 1)
    if not folder or n <= 1:
        return
    Path(folder, f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while len(list(Path(folder).glob("ready-*"))) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"profiling: the other {n - 1} processes did not start "
                               f"within {BARRIER_TIMEOUT:.0f} s")
        time.sleep(0.01)


def _measure(job: Mapping[str, Any]) -> dict:
    """The measurements, in a process of their own (``python -m distqat.stage_profile``)
    that runs as a worker does: its thread count, RPC up (a world of one), distributed
    autograd."""
    import torch
    import torch.distributed.rpc as rpc

    from . import driver_profile
    from .config import config_from_yaml
    from .data import make_objective
    from .devices import configure_cpu
    from .diloco import build_optimizer
    from .elastic.dist import free_port
    from .pipeline.build import build_full, build_stages, optimizer_groups

    cfg = config_from_yaml(job["config"], "the config to profile")
    io, cuts, micro, shapes = job["io"], job["cuts"], job["microbatch"], job["out_shapes"]
    configure_cpu(cfg)
    objective, dtype = make_objective(cfg.data), getattr(torch, cfg.dtype)
    mp = cfg.model_pipeline
    rpc.init_rpc("profile", rank=0, world_size=1, rpc_backend_options=rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{free_port()}", _transports=["uv"],
        num_worker_threads=cfg.comm.rpc_threads))
    try:
        stages = build_stages(cfg, io, forwards_per_step=mp.num_microbatches, cuts=cuts)
        out: Dict[str, Any] = {"stages": [], "threads": torch.get_num_threads()}
        _barrier(job)
        for s in range(mp.num_stages):
            module = stages.pop(s).to(dtype)
            opt = build_optimizer(optimizer_groups(cfg, module), cfg.diloco.inner_optim)
            (fwd, bwd, step), sd = _stage_times(
                module, _inputs(io, micro, shapes[s - 1] if s else None, dtype),
                _targets(io, micro), objective, opt, s == mp.num_stages - 1,
                cfg.quant.wire.activations, job["repeats"])
            out["stages"].append({"fwd_s": fwd, "bwd_s": bwd, "step_s": step, "sd_s": sd,
                                  "outer": _outer_times(cfg, module, job["repeats"])})
            del module, opt
        full = build_full(cfg, io).to(dtype)
        batch = cfg.diloco.batch_size_per_step
        opt = build_optimizer(optimizer_groups(cfg, full), cfg.diloco.inner_optim)
        (fwd, bwd, step), sd = _full_times(full, _inputs(io, batch, None, dtype),
                                           _targets(io, batch), objective, opt,
                                           job["repeats"])
        out["full"] = {"fwd_s": fwd, "bwd_s": bwd, "step_s": step, "sd_s": sd}
        out["driver_s"] = driver_profile.driver_s(cfg, io, objective, dtype, job["repeats"])
        out["rpc_s"] = (driver_profile.chain_message_s(cfg, io, job, objective, dtype,
                                                       out["driver_s"])
                        if mp.num_stages > 1 else driver_profile.rpc_message_s(job["repeats"]))
        return out
    finally:
        rpc.shutdown(graceful=False)


def _median_tree(trees: List[Any]) -> Any:
    """Element-wise median of equally shaped nested dicts/lists of numbers."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _median_tree([t[k] for t in trees]) for k in first}
    if isinstance(first, list):
        return [_median_tree([t[i] for t in trees]) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(trees)
    return first


def profile(cfg: Config, io: Mapping[str, Any], facts: ModelFacts, *, repeats: int = 3,
            key: Optional[Mapping[str, Any]] = None, concurrent: int = 1,
            timeout: float = PROFILE_TIMEOUT) -> dict:
    """Measure every stage and the whole model on this machine, in ``concurrent`` fresh
    processes at once (hosts that share this machine's cores, as in a namespace testbed;
    1 for a real host), each bounded by ``timeout`` and ended by its PID; the element-wise
    median of their figures is kept in the run folder and returned."""
    from .config import to_yaml

    job = {"config": to_yaml(cfg), "io": dict(io), "cuts": facts.cuts,
           "microbatch": facts.microbatch, "repeats": repeats, "concurrent": concurrent,
           "out_shapes": [list(st.out_shape) for st in facts.stages]}
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cfg.comm.threads_per_worker)),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory(prefix="distqat-profile") as tmp:
        path = Path(tmp) / "job.json"
        (Path(tmp) / "barrier").mkdir()
        path.write_text(json.dumps(dict(job, barrier=str(Path(tmp) / "barrier"))))
        deadline = time.monotonic() + timeout
        results = _run_all([[str(path)]] * concurrent, env, deadline)
        group = max(2, concurrent)
        calls = _run_all([["--collective", str(r), str(group), tmp, str(repeats)]
                          for r in range(group)], env, deadline)
    result = _median_tree(results)
    result["collective_s"] = statistics.median(calls)
    result.update(key=dict(key or profile_key(cfg, io, facts)), repeats=repeats,
                  concurrent=concurrent)
    write_json(cfg.run_path / PROFILE_FILE, result, durable=False)
    for s, st in enumerate(result["stages"]):
        log.info("stage %d: forward %.4g s, backward %.4g s, step %.4g s per micro-batch of %d",
                 s, st["fwd_s"], st["bwd_s"], st["step_s"], facts.microbatch)
    return result


def _run_all(argvs: List[List[str]], env: Mapping[str, str], deadline: float) -> List[Any]:
    """``python -m distqat.stage_profile ARGV`` once per ``argvs`` entry, all at once, each
    ended by its PID by ``deadline``; the last stdout line of each, as JSON."""
    procs = [subprocess.Popen([sys.executable, "-m", "distqat.stage_profile", *argv], env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in argvs]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if p.returncode != 0:
                raise RuntimeError(f"profiling failed (exit {p.returncode}): "
                                   f"{err.strip()[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        raise RuntimeError("profiling ran past its time limit") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return results


def _main() -> None:
    """``python -m distqat.stage_profile JOB.json``: one profiling process (see
    :func:`profile`); the figures as one JSON line on stdout. ``--collective RANK WORLD
    DIR REPEATS``: one rank of :func:`distqat.driver_profile.collective_call_s`."""
    if sys.argv[1] == "--collective":
        from .driver_profile import collective_call_s
        rank, world, folder, repeats = sys.argv[2:6]
        print(json.dumps(collective_call_s(int(rank), int(world), folder, int(repeats))))
        return
    from .compat import import_torchvision
    logging.getLogger("distqat.compat").setLevel(logging.ERROR)
    import_torchvision()
    print(json.dumps(_measure(json.loads(Path(sys.argv[1]).read_text()))), flush=True)


if __name__ == "__main__":
    _main()
