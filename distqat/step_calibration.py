"""A short real run that calibrates the profile's compute (``simulate --calibrate``).

:mod:`distqat.stage_profile` times each stage in a loop of its own. A real inner step does
more around the same work: the driver's data and futures, the RPC agent's threads,
distributed autograd's engine, the torchrun agent beside it, and on shared cores the
other replicas' processes all of these at once. On this machine's 2 cores two replicas'
inner steps were 1.17-1.56x what the loops added up to (BENCHMARKS.md), and the
predictions of compute-bound fleets were optimistic by as much.

:func:`calibrate` runs ``python -m distqat.local`` with the config itself for a few
seconds (``replicas`` pipelines on this machine, eval and checkpoints off, every step
logged), in a folder of its own, bounded by a timeout and ended by its process group.
It takes the mean of the replicas' inner steps past their first window (a step's own
time, as the training loop records it: the outer steps' waits are not in it) and the
cost model's inner step for the same replicas on this machine's loopback hops
(:func:`distqat.plan_cost.inner_step_s` with :data:`distqat.plan_cost.LOCAL`). Their ratio
``scale`` multiplies the stages' forward, backward and step times and the driver's own
work in :func:`distqat.simulate.workload`; the whole model's times (DDP, plain autograd,
none of the above) and the outer step's stay as profiled.

A run is the real thing, so it needs what training needs (the config's data files);
it costs a run's start-up (seconds) plus ``seconds`` of training. It runs every stage of a
pipeline on this machine: where a fleet puts stages on hosts of their own, a machine with
fewer cores than stages calibrates pessimistically.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from .config import Config, ConfigError, to_yaml

CALIBRATION_SECONDS = 3.0  # of inner steps the run is sized for (the model's estimate)
START_UP_TIMEOUT = 300.0  # seconds a run may take on top of its steps before it is ended
MIN_WINDOWS = 3  # outer steps: the first window is warm-up, the rest are measured
STOP_GRACE_S = 30.0  # for distqat.local to stop its workers when a run is ended


def run_steps(cfg: Config, replicas: int, outer_steps: int, folder: Path,
              timeout: float) -> List[List[float]]:
    """Each replica's inner step times (seconds, in order) of a ``distqat.local`` run of
    ``cfg`` with ``replicas`` pipelines, ``outer_steps`` outer steps, in ``folder``."""
    config = folder / "config.yaml"
    config.write_text(to_yaml(cfg))
    world = replicas * cfg.model_pipeline.num_stages
    overrides = [f"world_size={world}", f"diloco.outer_steps={outer_steps}", "log_every=1",
                 "eval_every=0", "param_mirror.enable=false", f"run_dir={folder / 'runs'}",
                 "experiment_prefix=calibration"]
    cmd = [sys.executable, "-m", "distqat.local", "--config", str(config), *overrides]
    env = dict(os.environ, DISTQAT_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"calibration: the run took over {timeout:.0f} s") from None
    finally:
        if proc.poll() is None:  # ended by its PID: SIGTERM stops its workers (their own
            proc.terminate()     # sessions: torch's launcher), then SIGKILL if it hangs
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    if proc.returncode == 2:  # distqat.local's one line on a user error: data, config
        line = out.strip().splitlines()[-1].removeprefix("distqat: ")
        raise ConfigError(f"--calibrate: the run refused: {line}")
    if proc.returncode != 0:
        raise RuntimeError(f"calibration: the run failed (exit {proc.returncode}): "
                           f"{out.strip()[-3000:]}")
    return [_step_times(folder / "runs" / "calibration" / f"replica{r}")
            for r in range(replicas)]


def _step_times(folder: Path) -> List[float]:
    """A replica's inner step times from its TensorBoard scalars (every step logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    sizes = [e.value for e in events.Scalars("train/batch_size")]
    rates = [e.value for e in events.Scalars("train/samples_per_s")]
    return [b / r for b, r in zip(sizes, rates)]


def calibrate(cfg: Config, model_step_s: float, replicas: int,
              seconds: float = CALIBRATION_SECONDS) -> Dict[str, float]:
    """The measured inner step of a short real run against ``model_step_s`` (the cost
    model's, from the profile, on this machine's loopback hops): ``scale`` and the figures
    it comes from."""
    H = cfg.diloco.inner_steps
    outer = max(MIN_WINDOWS, math.ceil(seconds / (model_step_s * H)))
    with tempfile.TemporaryDirectory(prefix="distqat-calibration") as tmp:
        steps = run_steps(cfg, replicas, outer, Path(tmp),
                          START_UP_TIMEOUT + 10 * outer * H * model_step_s)
    measured = statistics.fmean(t for replica in steps for t in replica[H:])
    return {"run_step_s": measured, "model_step_s": model_step_s,
            "scale": measured / model_step_s, "replicas": replicas,
            "steps": sum(len(replica[H:]) for replica in steps)}


def calibrated_for(cfg: Config, replicas: int) -> Dict[str, object]:
    """What a calibration depends on beyond the profile's key: the outer steps between
    inner steps (their work slows the next steps: 8.5-8.8 ms a step every 5 inner steps
    against 7.4-7.5 every 25 in BENCHMARKS.md's check) and the pipelines sharing the
    machine."""
    d = cfg.diloco
    return {"inner_steps": d.inner_steps, "pseudo_grads": cfg.quant.wire.pseudo_grads,
            "fragments": d.fragments, "replicas": replicas}


def needs_calibration(cfg: Config, times: dict, replicas: int) -> bool:
    """Whether ``times`` lacks a calibration for ``cfg`` and ``replicas`` pipelines."""
    return times.get("calibration", {}).get("for") != calibrated_for(cfg, replicas)


def with_calibration(cfg: Config, facts, times: dict, replicas: int,
                     seconds: float = CALIBRATION_SECONDS) -> dict:
    """``times`` with a ``calibration`` entry for ``cfg`` and ``replicas`` pipelines
    (:func:`calibrate`: the model's step from ``times`` as profiled), run unless ``times``
    holds one already."""
    from . import plan_cost as pc
    from .simulate import workload

    if not needs_calibration(cfg, times, replicas):
        return times
    bare = {k: v for k, v in times.items() if k != "calibration"}
    w = workload(cfg, facts, bare)
    model_step_s = pc.inner_step_s(w, [pc.LOCAL] * (len(w.stages) - 1))
    return dict(bare, calibration=dict(calibrate(cfg, model_step_s, replicas, seconds),
                                       **{"for": calibrated_for(cfg, replicas)}))
