"""distqat against what a user would otherwise pick, side by side, in one run.

    python bench/peers.py [--part pipeline|diloco|all] [--repeats 3]
                          [--models wide resnet18] [--microbatches 2 4 8] [--schedules gpipe 1f1b]
                          [--replicas 2 4] [--inner-steps 10 50 100] [--wires fp32 bf16 int8]
                          [--diloco-steps 600] [--json OUT] [--quick] [--timeout 900]

**Pipeline** (``--part pipeline``). The same 2 stages trained three ways, same batch, same
steps, same inner optimizer (AdamW, the config's), same data (shard 0 of the task):

* distqat: ``python -m distqat.local --nproc 2`` (2 processes x 1 thread, RPC), each
  ``model_pipeline.schedule`` (gpipe, 1f1b) and micro-batch count; samples/s is
  ``summary.json``'s (the summed time of every inner step, the first one included, plus
  the outer step; no start-up). One replica, one outer step at the end (``outer_steps=1``),
  so the only DiLoCo work is that one local outer step (~1% of the time).
* ``torch.distributed.pipelining``: ``PipelineStage`` + ``ScheduleGPipe`` / ``Schedule1F1B``
  on gloo, 2 processes x 1 thread, 127.0.0.1. Each rank builds *its* stage with distqat's
  own ``build_stages`` (the very modules, cut and initial weights of the distqat run: the
  first step's loss matches distqat's, printed as a check) and ``torch.optim``'s inner
  optimizer with the config's hyperparameters (distqat's own, :mod:`distqat.optim`, has
  the same arithmetic). Timed like ``summary.json``: from a barrier before the first step to
  a barrier after the last, every step counted (the first, which infers shapes, included;
  the JSON also holds the rate without it). The batches are made before timing (distqat
  prefetches them in a thread). All peer setups of a repeat run in one pair of processes,
  each with fresh stages, optimizer and schedule.
* the baseline: ``mode=baseline``, the full model in 1 process with 2 threads.

Models: ``wide``, the MLP of ``bench/pipeline.py`` (32 -> 1024 x 6 -> 10, batch 256, 30
steps), and ``resnet18`` at CIFAR shape (torchvision's, CIFAR stem, batch norm, batch 32,
10 steps) on the ``teacher`` task with ``data.input_shape=[3,32,32]``: synthetic N(0, 1)
images labelled by a fixed random network (CIFAR itself cannot be downloaded here; the
teacher costs nothing to produce, so the figures are compute and communication only).
Runs are interleaved (each repeat runs every setup once, in turn, the order reversed every
other repeat); medians over ``--repeats``. Ratios: distqat's best setup / the peer's best,
and the pipeline's best / the baseline.

**DiLoCo against DDP** (``--part diloco``). The tiny MLP of ``configs/tiny.yaml`` (32 ->
128 x 4 -> 10, 55k parameters) on its teacher task, batch 64 per replica, N replicas
(``--replicas``): distqat with one stage per replica (``num_stages=1``, ``world_size=N``),
``diloco.inner_steps=H`` and ``quant.wire.pseudo_grads=fp32|bf16|int8``, against
``DistributedDataParallel`` on gloo, N processes x 1 thread, the same full model (same
initial weights), inner optimizer (``torch.optim``'s, same hyperparameters) and
per-replica batch, rank r reading the shard replica r
reads. Both train ``--diloco-steps`` inner steps per replica (a multiple of every H), so
the samples are equal. Bytes per sample = the payload every rank handed to its
collectives, summed over ranks, over all samples of all replicas: distqat's
``bytes_allreduced`` (``DiLoCo``'s ``bytes_sent``: the flat fp32 tensor it all-reduces, or
its bf16/int8 payload and int8 scales that it all-gathers), and for DDP the gradient
buckets a comm hook wrapping ``allreduce_hook`` hands to ``all_reduce``. Eval loss: the
task's held-out set (``data.eval_samples=2048``) and objective on the final model
(distqat's ``eval_last``: after the last outer step every replica holds the global model).
This part is deterministic (single-threaded ranks, fixed seeds, fixed reduction order):
one run each, whatever ``--repeats``.

Caveats: 2 shared cores, 1 thread per process (the baseline 2): timings are noisy; the
machine hosts both pipeline processes, so the pipeline can at best match a perfectly
parallel baseline. "Bytes handed to collectives" is the accounting rule, not the bytes on
the wire: a ring all-reduce (DDP, DiLoCo fp32) sends about 2(N-1)/N times its payload per
rank, an all-gather (DiLoCo bf16/int8) N-1 times; the table adds that estimate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the wide MLP is bench/pipeline.py's, imported so that the two benchmarks cannot drift
_spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
bench_pipeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_pipeline)

PREFIX = "peers"
PIPE_COMMON = ["diloco.outer_steps=1", "eval_every=0", "log_every=1000",
               "param_mirror.enable=false", f"experiment_prefix={PREFIX}"]
PIPE_MODELS = {  # overrides, steps (default, --quick)
    "wide": (bench_pipeline.MODELS["wide"], 30, 4),
    "resnet18": (["model_pipeline.model=resnet18", "data.input_shape=[3,32,32]",
                  "model_pipeline.model_args.cifar_stem=true",
                  "model_pipeline.model_args.norm=batch", "diloco.batch_size_per_step=32"],
                 10, 2),
}
PEER_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}
DILOCO_COMMON = ["model_pipeline.num_stages=1", "model_pipeline.num_microbatches=1",
                 "data.eval_samples=2048", "log_every=1000", "param_mirror.enable=false",
                 f"experiment_prefix={PREFIX}"]  # tiny.yaml's MLP, task and batch
DEFAULTS = dict(repeats=3, models=list(PIPE_MODELS), microbatches=[2, 4, 8],
                schedules=["gpipe", "1f1b"], replicas=[2, 4], inner_steps=[10, 50, 100],
                wires=["fp32", "bf16", "int8"], diloco_steps=600)
QUICK = dict(repeats=1, models=list(PIPE_MODELS), microbatches=[2],
             schedules=["gpipe", "1f1b"], replicas=[2], inner_steps=[5],
             wires=["fp32", "bf16", "int8"], diloco_steps=10)


# ---------------------------------------------------------------- distqat, as a user runs it

def _end_tree(proc: subprocess.Popen) -> None:
    """End the launcher and the workers it started (found before it goes: torch's agent
    starts them in sessions of their own), by PID."""
    import psutil
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()  # distqat.local stops its workers on SIGTERM
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_distqat(args: list[str], threads: int, timeout: float) -> dict:
    """``python -m distqat.local ARGS`` in a scratch folder; its ``summary.json``."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, DISTQAT_NO_PROGRESS="1", OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "distqat.local", *args,
               f"comm.threads_per_worker={threads}"]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end_tree(proc)
            raise RuntimeError(f"{' '.join(cmd)}: no result within {timeout:.0f} s") from None
        summary_path = Path(tmp) / "runs" / PREFIX / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if proc.returncode != 0 or summary.get("exit_reason") != "completed":
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{out[-4000:]}")
        return summary


# ---------------------------------------------------------------- peers, in spawned processes

def _spawn(target, world: int, args: tuple, timeout: float) -> list:
    """``target(rank, world, *args)`` on ``world`` spawned processes joined by gloo on
    127.0.0.1 (1 thread each); what each returned (plain Python data), by rank. Every
    process is ended by PID at the end, and none runs past ``timeout`` seconds."""
    import queue as queues

    from distqat.elastic.dist import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_entry, args=(target, r, world, port, queue, args))
             for r in range(world)]
    results: dict = {}
    saved = os.environ.get("OMP_NUM_THREADS")
    try:
        os.environ["OMP_NUM_THREADS"] = "1"  # the children's, before torch loads there
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for _ in procs:
            try:
                rank, status, value = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            except queues.Empty:
                raise RuntimeError(f"{target.__name__}: no result within {timeout:.0f} s; "
                                   f"ranks done: {sorted(results)}") from None
            if status != "ok":
                raise RuntimeError(f"{target.__name__} rank {rank} failed:\n{value}")
            results[rank] = value
        for p in procs:
            p.join(30)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [results[r] for r in range(world)]


def _entry(target, rank: int, world: int, port: int, queue, args: tuple) -> None:
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=300))
        queue.put((rank, "ok", target(rank, world, *args)))  # plain Python data only
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def _config(overrides: list[str]):
    from distqat.config import load_config
    return load_config(None, overrides)


def torch_optimizer(params, cfg):
    """``torch.optim``'s optimizer named by ``cfg`` (an ``OptimConfig``), as a user of the
    peers would build it: the hyperparameters of distqat's own (:mod:`distqat.optim`, the
    same arithmetic), torch's implementation. Built before any timing starts (building
    one imports torch._dynamo, ~1 s of CPU)."""
    import torch
    if cfg.name in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def peer_pipeline(rank: int, world: int, overrides: list[str], setups: list, steps: int) -> list:
    """One rank of torch.distributed.pipelining, every setup (schedule, micro-batches) in
    turn, each with fresh stages and optimizer; per setup its timing (and, on the last
    stage, the first step's loss)."""
    import torch
    import torch.distributed as dist
    from torch.distributed import pipelining

    from distqat.data import make_task
    from distqat.devices import cpu_modes
    from distqat.pipeline.build import build_stages, optimizer_groups

    cfg = _config(overrides)
    cpu_modes(cfg)  # subnormals and malloc, as distqat's workers do
    task = make_task(cfg.data)
    objective, batch = task.objective, cfg.diloco.batch_size_per_step
    batches = [task.batch(0, s * batch, batch) for s in range(steps)]
    batches = [(objective.prepare_input(x, torch.float32), y) for x, y in batches]
    results = []
    for schedule, micro in setups:
        module = build_stages(cfg, task.model_io(), [rank])[rank]
        optimizer = torch_optimizer(optimizer_groups(cfg, module), cfg.diloco.inner_optim)
        stage = pipelining.PipelineStage(module, rank, world, torch.device("cpu"))
        runner = getattr(pipelining, PEER_SCHEDULES[schedule])(stage, micro,
                                                               loss_fn=objective.loss)
        first_loss, stamps = None, []
        dist.barrier()
        t0 = time.perf_counter()
        for x, y in batches:
            if rank == 0:
                runner.step(x)
            else:
                losses: list = []
                runner.step(target=y, losses=losses)
                if first_loss is None:
                    first_loss = float(sum(l.detach() for l in losses) / len(losses))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stamps.append(time.perf_counter() - t0)
        dist.barrier()
        seconds = time.perf_counter() - t0
        results.append({"schedule": schedule, "microbatches": micro, "seconds": seconds,
                        "first_step_s": stamps[0], "samples": steps * batch,
                        "first_loss": first_loss})
    return results


def run_peer(overrides: list[str], setups: list, steps: int, timeout: float) -> dict:
    """samples/s of every peer setup, from one pair of processes."""
    ranks = _spawn(peer_pipeline, 2, (overrides, setups, steps), timeout)
    out = {}
    for i, (schedule, micro) in enumerate(setups):
        r0, r1 = ranks[0][i], ranks[1][i]
        seconds = max(r0["seconds"], r1["seconds"])
        rest = seconds - r0["first_step_s"]
        out[(schedule, micro)] = {
            "samples_per_s": r0["samples"] / seconds,
            "samples_per_s_after_first": (r0["samples"] * (steps - 1) / steps / rest
                                          if steps > 1 and rest > 0 else None),
            "loss_first": r1["first_loss"]}
    return out


def ddp_replica(rank: int, world: int, overrides: list[str], steps: int) -> dict:
    """One DDP rank: the full model, the inner optimizer, shard ``rank``; the bytes of the
    gradient buckets it hands to all_reduce; rank 0 evaluates the final model."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from distqat.data import make_task
    from distqat.devices import cpu_modes
    from distqat.pipeline.build import build_full, optimizer_groups
    from distqat.pipeline.driver import evaluate_in_chunks

    cfg = _config(overrides)
    cpu_modes(cfg)  # subnormals and malloc, as distqat's workers do
    task = make_task(cfg.data)
    objective, batch = task.objective, cfg.diloco.batch_size_per_step
    model = build_full(cfg, task.model_io())
    ddp = DistributedDataParallel(model)
    handed = [0]

    def counting_allreduce(state, bucket):
        buf = bucket.buffer()
        handed[0] += buf.numel() * buf.element_size()
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)  # state None: the default group
    optimizer = torch_optimizer(optimizer_groups(cfg, model), cfg.diloco.inner_optim)

    def evaluate() -> float:
        ex, ey = task.eval_set()
        model.eval()
        with torch.no_grad():
            metrics = evaluate_in_chunks(objective, lambda xs, ys: objective.eval_sums(
                model(objective.prepare_input(xs, torch.float32)), ys), ex, ey, batch)
        model.train()
        return metrics["loss"]

    eval_first = evaluate() if rank == 0 else None
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = task.batch(rank, step * batch, batch)
        loss = objective.loss(ddp(objective.prepare_input(x, torch.float32)), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {"bytes": handed[0], "samples": steps * batch, "seconds": seconds,
            "eval_first": eval_first, "eval_last": evaluate() if rank == 0 else None}


# ---------------------------------------------------------------- the two parts

def _interleaved(model: str, a) -> tuple[dict, dict]:
    """Every setup of ``model`` once per repeat, in turn (reversed every other repeat):
    samples/s by setup, and per run what the check lines need."""
    overrides, steps, quick_steps = PIPE_MODELS[model]
    base = PIPE_COMMON + overrides + [f"diloco.inner_steps={quick_steps if a.quick else steps}"]
    pipe = base + ["model_pipeline.num_stages=2"]
    combos = [(s, m) for m in a.microbatches for s in a.schedules]
    order = [("baseline",)] + [("distqat",) + c for c in combos] + ["peer"]
    runs: dict = {k: [] for k in order[:-1] + [("torch",) + c for c in combos]}
    extra: dict = {k: [] for k in runs}
    for repeat in range(a.repeats):
        for key in order if repeat % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            if key == "peer":  # every peer setup, in one pair of processes
                peer = run_peer(pipe, combos if repeat % 2 == 0 else combos[::-1],
                                quick_steps if a.quick else steps, a.timeout)
                for c, r in peer.items():
                    runs[("torch",) + c].append(r["samples_per_s"])
                    extra[("torch",) + c].append(r)
            elif key == ("baseline",):
                runs[key].append(run_distqat(base + ["mode=baseline"], 2,
                                             a.timeout)["samples_per_s"])
            else:
                s = run_distqat(["--nproc", "2"] + pipe + [
                    f"model_pipeline.num_microbatches={key[2]}",
                    f"model_pipeline.schedule={key[1]}"], 1, a.timeout)
                runs[key].append(s["samples_per_s"])
                extra[key].append({"loss_first": s["loss_first"]})
            name = "torch.distributed.pipelining" if key == "peer" else " ".join(map(str, key))
            print(f"  {model} repeat {repeat + 1}: {name} done in "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return runs, extra


def _setup_name(key: tuple) -> str:
    if key[0] == "baseline":
        return "baseline (`mode=baseline`), 1 process x 2 threads"
    if key[0] == "distqat":
        return f"distqat, {key[1]}, {key[2]} micro-batches"
    return f"torch.distributed.pipelining {PEER_SCHEDULES[key[1]]}, {key[2]} micro-batches"


def bench_pipeline_model(model: str, a) -> dict:
    """The table rows of ``model`` (printed) and its figures, summary and checks."""
    runs, extra = _interleaved(model, a)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ours = max((k for k in med if k[0] == "distqat"), key=med.get)
    theirs = max((k for k in med if k[0] == "torch"), key=med.get)
    baseline = med[("baseline",)]
    for key, values in runs.items():
        print(f"| {model} | {_setup_name(key)} | {med[key]:.0f} | "
              f"{', '.join(f'{v:.0f}' for v in values)} | {med[key] / baseline:.2f} | "
              f"{med[key] / med[theirs]:.2f} |", flush=True)
    after_first = statistics.median(r["samples_per_s_after_first"] or math.nan
                                    for r in extra[theirs])
    summary = (f"{model}: distqat's best ({ours[1]}, {ours[2]} micro-batches) / "
               f"torch.distributed.pipelining's best ({PEER_SCHEDULES[theirs[1]]}, "
               f"{theirs[2]}): **{med[ours] / med[theirs]:.2f}** (goal >= 1.0: "
               f"{'met' if med[ours] >= med[theirs] else 'MISSED'}; {med[ours] / after_first:.2f} "
               f"against the peer's {after_first:.0f} samples/s without its first step); "
               f"pipeline's best / baseline: **{med[ours] / baseline:.2f}**")
    if model == "wide":
        summary += f" (goal >= 0.9: {'met' if med[ours] >= 0.9 * baseline else 'MISSED'})"
    pairs = [(k[1:], statistics.median(r["loss_first"] for r in extra[k]),
              statistics.median(r["loss_first"] for r in extra[("torch",) + k[1:]]))
             for k in runs if k[0] == "distqat"]
    check = ("  check, first-step loss, distqat / torch.distributed.pipelining (same stages, "
             "same first batch): " + ", ".join(f"{s} {m}: {d:.4f} / {t:.4f}"
                                               for (s, m), d, t in pairs))
    name = " ".join
    return {"summary": summary + ".", "check": check,
            "samples_per_s": {name(map(str, k)): v for k, v in runs.items()},
            "median": {name(map(str, k)): v for k, v in med.items()},
            "peer_samples_per_s_after_first": {
                name(map(str, k)): [r["samples_per_s_after_first"] for r in v]
                for k, v in extra.items() if k[0] == "torch"},
            "loss_first": {name(map(str, k)): [r["loss_first"] for r in v]
                           for k, v in extra.items() if v}}


def part_pipeline(a) -> dict:
    print(f"\n## distqat's pipeline against torch.distributed.pipelining and the baseline\n\n"
          f"{a.repeats} interleaved run(s) per setup, medians, samples/s. 2 processes x 1 "
          f"thread (baseline: 1 x 2); one replica.\n")
    print("| model | setup | samples/s (median) | runs | / baseline | / peer's best |")
    print("|---|---|---|---|---|---|")
    out = {model: bench_pipeline_model(model, a) for model in a.models}
    print()
    for model in a.models:
        print(out[model]["summary"])
        print(out[model]["check"])
    return out


def _wire_factor(collective: str, n: int) -> float:
    """Bytes a rank sends per payload byte: ring all-reduce 2(n-1)/n, all-gather n-1."""
    return 2 * (n - 1) / n if collective == "all_reduce" else n - 1


def part_diloco(a) -> dict:
    print(f"\n## DiLoCo against DDP at equal samples\n\ntiny MLP (configs/tiny.yaml) on the "
          f"teacher task, batch 64 per replica, {a.diloco_steps} inner steps per replica; "
          f"bytes = payload each rank hands to its collectives, summed, per sample of all "
          f"replicas; wire estimate: ring all-reduce 2(N-1)/N, all-gather N-1 times that.\n")
    print("| replicas | setup | bytes/sample | DDP's / this | est. wire bytes/sample | "
          "eval loss | / DDP's |")
    print("|---|---|---|---|---|---|---|")
    out: dict = {}
    for n in a.replicas:
        t0 = time.perf_counter()
        ranks = _spawn(ddp_replica, n, (DILOCO_COMMON, a.diloco_steps), a.timeout)
        ddp = {"bytes": sum(r["bytes"] for r in ranks),
               "samples": sum(r["samples"] for r in ranks),
               "eval_first": ranks[0]["eval_first"], "eval_last": ranks[0]["eval_last"],
               "samples_per_s": sum(r["samples"] / r["seconds"] for r in ranks),
               "wall_s": time.perf_counter() - t0}
        ddp_bps = ddp["bytes"] / ddp["samples"]
        rows = {"ddp": ddp}
        print(f"| {n} | DDP (fp32 gradients, every step) | {ddp_bps:.1f} | 1.0 | "
              f"{ddp_bps * _wire_factor('all_reduce', n):.1f} | {ddp['eval_last']:.4f} | 1.000 |",
              flush=True)
        for h in a.inner_steps:
            for wire in a.wires:
                t0 = time.perf_counter()
                s = run_distqat(["--nproc", str(n)] + DILOCO_COMMON + [
                    f"diloco.inner_steps={h}", f"diloco.outer_steps={a.diloco_steps // h}",
                    f"eval_every={a.diloco_steps // h}", f"quant.wire.pseudo_grads={wire}"],
                    1, a.timeout)
                samples = sum(r["samples"] for r in s["replicas"])
                if samples != ddp["samples"] or s["outer_steps_done"] != a.diloco_steps // h:
                    raise RuntimeError(f"DiLoCo H={h} {wire}: {samples} samples, "
                                       f"{s['outer_steps_done']} outer steps; expected "
                                       f"{ddp['samples']}, {a.diloco_steps // h}")
                bps = s["bytes_allreduced"] / samples
                collective = "all_reduce" if wire == "fp32" else "all_gather"
                row = {"bytes": s["bytes_allreduced"], "samples": samples,
                       "eval_first": s["eval_first"]["loss"], "eval_last": s["eval_last"]["loss"],
                       "samples_per_s": s["samples_per_s"], "wall_s": time.perf_counter() - t0}
                rows[f"diloco H={h} {wire}"] = row
                print(f"| {n} | DiLoCo, {wire} pseudo-gradients, inner_steps {h} | {bps:.2f} | "
                      f"{ddp_bps / bps:.1f} | {bps * _wire_factor(collective, n):.2f} | "
                      f"{row['eval_last']:.4f} | {row['eval_last'] / ddp['eval_last']:.3f} |",
                      flush=True)
        out[str(n)] = rows
    print()
    for n, rows in out.items():
        ddp = rows["ddp"]
        firsts = {round(r["eval_first"], 6) for r in rows.values()}
        print(f"{n} replicas: eval loss before training {sorted(firsts)} (one value: the same "
              f"initial model everywhere); DDP {ddp['eval_first']:.4f} -> {ddp['eval_last']:.4f}.")
        goal = rows.get("diloco H=100 int8")
        if goal is not None:
            fewer = (ddp["bytes"] / ddp["samples"]) / (goal["bytes"] / goal["samples"])
            ratio = goal["eval_last"] / ddp["eval_last"]
            print(f"  goal (int8, inner_steps 100): {fewer:.1f}x fewer bytes/sample (>= 400: "
                  f"{'met' if fewer >= 400 else 'MISSED'}), eval loss {ratio:.3f}x DDP's "
                  f"(<= 1.02: {'met' if ratio <= 1.02 else 'MISSED'}).")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["pipeline", "diloco", "all"], default="all")
    ap.add_argument("--repeats", type=int, help="interleaved repeats of the pipeline part")
    ap.add_argument("--models", nargs="+", choices=list(PIPE_MODELS))
    ap.add_argument("--microbatches", type=int, nargs="+")
    ap.add_argument("--schedules", nargs="+", choices=list(PEER_SCHEDULES))
    ap.add_argument("--replicas", type=int, nargs="+")
    ap.add_argument("--inner-steps", type=int, nargs="+")
    ap.add_argument("--wires", nargs="+", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--diloco-steps", type=int,
                    help="inner steps per replica, DiLoCo and DDP alike (multiple of each H)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--quick", action="store_true",
                    help="smallest settings that run every code path (a smoke run)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    a = ap.parse_args(argv)
    for key, value in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.repeats < 1 or min(a.replicas) < 2 or min(a.microbatches) < 1:
        ap.error("--repeats >= 1, --replicas >= 2, --microbatches >= 1")
    if a.part != "pipeline" and any(h < 1 or a.diloco_steps % h for h in a.inner_steps):
        ap.error(f"--diloco-steps {a.diloco_steps} must be a multiple of every --inner-steps "
                 f"{a.inner_steps} (DiLoCo and DDP train the same samples)")
    command = "python bench/peers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    import torch
    print(f"# bench/peers.py\n\nCommand: `{command.strip()}` (torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores)")
    started = time.perf_counter()
    result: dict = {"command": command.strip(), "torch": torch.__version__}
    for part, run in (("pipeline", part_pipeline), ("diloco", part_diloco)):
        if a.part in (part, "all"):
            result[part] = run(a)
            result["wall_s"] = time.perf_counter() - started
            if a.json:  # after each part: a failure in the next keeps this one's figures
                a.json.write_text(json.dumps(result, indent=1))
    print(f"\n(wall time {result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
