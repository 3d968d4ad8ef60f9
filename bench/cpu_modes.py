"""The CPU settings every training process applies, each true (the default) against false.

    python bench/cpu_modes.py --setting flush_denormal|malloc_reuse [--repeats 3]
                              [--outer-steps 60] [--json OUT] [--set KEY=VALUE ...]

``flush_denormal``: once the teacher task is nearly learned, some of AdamW's second
moments decay below float32's normal range (1.2e-38), and x86 CPUs compute with
subnormal operands in microcode, many times slower. ``malloc_reuse``: glibc hands freed
tensors' memory back to the kernel, and the next step faults its pages in again
(``distqat.devices.keep_freed_memory``). The run: ``configs/tiny.yaml``'s task on a 512-wide MLP
(``bench/simulate_check.py``'s setup: 0.81M parameters, batch 64), 2 replicas of one
stage through ``python -m distqat.local``, 1 thread per worker, DiLoCo every 25 inner
steps. Per run: training seconds (``summary.json``), the final loss, the inner step
(``train/samples_per_s``, logged every 25 inner steps) and the stages' optimizer step
(``train/inner_step_s``) in the first and the last tenth of the run, and the minor page
faults of all its processes (start-up included). Runs interleaved (true, false, false,
true, ...); medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
COMMON = ["world_size=2", "model_pipeline.model_args.hidden=512", "model_pipeline.num_stages=1",
          "model_pipeline.num_microbatches=1", "diloco.batch_size_per_step=64",
          "diloco.inner_steps=25", "param_mirror.enable=false", "eval_every=0",
          "log_every=25", "comm.threads_per_worker=1", "experiment_prefix=cpumodes"]


def run(setting: str, on: bool, outer_steps: int, overrides: list) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, DISTQAT_NO_PROGRESS="1", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "distqat.local", "--config", str(ROOT / "configs" / "tiny.yaml"),
               *COMMON, f"diloco.outer_steps={outer_steps}", *overrides,
               f"{setting}={str(on).lower()}"]
        faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        run_dir = Path(tmp) / "runs" / "cpumodes"
        summary = json.loads((run_dir / "summary.json").read_text())
        acc = EventAccumulator(str(run_dir / "replica0"))
        acc.Reload()
        steps = [e.value for e in acc.Scalars("train/inner_step_s")]
        inner = [b.value / r.value for b, r in zip(acc.Scalars("train/batch_size"),
                                                   acc.Scalars("train/samples_per_s"))]
    tenth = max(1, len(steps) // 10)
    return {setting: on, "train_s": summary["train_seconds"],
            "loss_last": summary["loss_last"],
            "inner_ms": 1e3 * statistics.median(inner),
            "faults_k": faults / 1e3,
            "step_ms_first": 1e3 * statistics.median(steps[:tenth]),
            "step_ms_last": 1e3 * statistics.median(steps[-tenth:])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=["flush_denormal", "malloc_reuse"], required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--outer-steps", type=int, default=60)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run (after the common ones)")
    a = ap.parse_args(argv)
    runs = []
    for repeat in range(a.repeats):
        for on in ((True, False) if repeat % 2 == 0 else (False, True)):
            runs.append(run(a.setting, on, a.outer_steps, a.set))
            print(json.dumps(runs[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))
    print(f"| {a.setting} | training s | inner step (ms) | optimizer step, first tenth (ms) "
          "| last tenth (ms) | page faults (thousands) | final loss |\n"
          "|---|---|---|---|---|---|---|")
    for on in (True, False):
        mine = [r for r in runs if r[a.setting] == on]
        med = {k: statistics.median(r[k] for r in mine)
               for k in ("train_s", "inner_ms", "step_ms_first", "step_ms_last", "faults_k",
                         "loss_last")}
        print(f"| {str(on).lower()} | {med['train_s']:.2f} | {med['inner_ms']:.2f} "
              f"| {med['step_ms_first']:.2f} | {med['step_ms_last']:.2f} "
              f"| {med['faults_k']:.0f} | {med['loss_last']:.4f} |")


if __name__ == "__main__":
    main()
