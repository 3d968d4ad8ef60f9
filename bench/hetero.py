"""One replica three times slower: fixed equal windows against ``diloco.balance``.

    python bench/hetero.py [--replicas 2 3] [--optims adamw sgd] [--modes batch steps]
                           [--slowdown 3] [--repeats 3] [--json OUT]

N replicas of one stage each (``world_size=N``, ``num_stages=1``, 1 thread per worker)
train the same number of samples (``outer_steps x inner_steps x N x batch``) on the
``teacher`` task with a wider MLP than ``configs/tiny.yaml`` (hidden 1024, batch 512, so a
step is mostly compute). Replica 1 is made ``--slowdown`` times slower with the test-only
``DISTQAT_TEST_SLOWDOWN`` (its driver sleeps after each inner step, see
``distqat/faults.py``: sleeping takes no core, so the others keep theirs). Each setup runs
``python -m distqat.local`` and reads its ``summary.json``: ``wall_seconds`` (the job,
from the workers' start to the summary), ``train_seconds`` (the time to the fixed number
of samples: the slowest replica's inner steps and outer-step waits, start-up excluded) and
``eval_last`` (the held-out loss of the final global model). ``--modes``: the balancing
modes set against equal windows (``batch``: batch sizes, ``steps``: inner steps per
window). Runs are interleaved (equal, each mode, equal, ...); repeat k runs every setup
with ``seed=k`` and ``data.seed=k`` (initial weights, and the teacher and its sample
stream: the loss after 100 steps varies with them by more than the 2% we compare at, so
every setup meets the same ones) and a held-out set of 4096 samples; medians over
``--repeats``, and the median of the per-seed loss ratios. Every process is bounded by ``--timeout`` and ended by its
PID.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["model_pipeline.num_stages=1", "model_pipeline.model_args.hidden=1024",
          "diloco.batch_size_per_step=512", "diloco.inner_steps=10", "diloco.outer_steps=10",
          "comm.threads_per_worker=1", "eval_every=10", "log_every=10",
          "data.eval_samples=4096"]


OPTIMS = {"adamw": [],  # the config's (AdamW, lr 1e-3)
          "sgd": ["diloco.inner_optim.name=sgd", "diloco.inner_optim.lr=0.05",
                  "diloco.inner_optim.momentum=0.9"]}


def run_once(replicas: int, balance: str, slowdown: float, timeout: float,
             optim: str = "adamw", seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix="hetero-") as folder:
        env = dict(os.environ, DISTQAT_TEST_SLOWDOWN=f"1:{slowdown}", DISTQAT_NO_PROGRESS="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        args = [sys.executable, "-m", "distqat.local", f"world_size={replicas}", *COMMON,
                *OPTIMS[optim], f"diloco.balance={balance}", f"seed={seed}", f"data.seed={seed}"]
        proc = subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # its own session: the launcher and its workers
            proc.communicate()
            raise SystemExit(f"hetero: {' '.join(args)} ran past {timeout} s")
        if proc.returncode != 0:
            raise SystemExit(f"hetero: run failed ({proc.returncode}):\n{out[-3000:]}")
        summary = json.loads((Path(folder) / "runs" / "tiny" / "summary.json").read_text())
        samples = {r["replica"]: r["samples"] for r in summary["replicas"]}
        return {"wall_s": summary["wall_seconds"], "train_s": summary["train_seconds"],
                "eval_loss": summary["eval_last"]["loss"],
                "samples": [samples[r] for r in sorted(samples)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--slowdown", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optims", nargs="+", choices=sorted(OPTIMS), default=["adamw"])
    parser.add_argument("--modes", nargs="+", choices=["batch", "steps"],
                        default=["batch", "steps"])
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for n, optim in [(n, o) for n in args.replicas for o in args.optims]:
        setups = ["off", *args.modes]
        runs = {setup: [] for setup in setups}
        for repeat in range(args.repeats):  # repeat k: seed k (weights, data order)
            for setup in setups:
                runs[setup].append(run_once(n, setup, args.slowdown, args.timeout, optim,
                                            seed=repeat))
        med = {setup: {k: statistics.median(r[k] for r in runs[setup])
                       for k in ("wall_s", "train_s", "eval_loss")} for setup in setups}
        for mode in args.modes:
            row = {"replicas": n, "optim": optim, "slowdown": args.slowdown, "mode": mode,
                   "equal": med["off"], "balanced": med[mode],
                   "samples_balanced": runs[mode][-1]["samples"],
                   "speedup": med["off"]["train_s"] / med[mode]["train_s"],
                   "loss_ratio": med[mode]["eval_loss"] / med["off"]["eval_loss"],
                   "loss_ratios": [b["eval_loss"] / e["eval_loss"]
                                   for b, e in zip(runs[mode], runs["off"])],
                   "speedups": [e["train_s"] / b["train_s"]
                                for b, e in zip(runs[mode], runs["off"])],
                   "runs": {"off": runs["off"], mode: runs[mode]}}
            rows.append(row)
            print(f"{n} replicas ({optim}), replica 1 x{args.slowdown:g} slower, balance "
                  f"{mode}: training {med['off']['train_s']:.1f} s equal -> "
                  f"{med[mode]['train_s']:.1f} s balanced ({row['speedup']:.2f}x less; job "
                  f"{med['off']['wall_s']:.1f} -> {med[mode]['wall_s']:.1f} s); eval loss "
                  f"{med['off']['eval_loss']:.4f} -> {med[mode]['eval_loss']:.4f} "
                  f"({row['loss_ratio']:.3f}x; per seed "
                  f"{' '.join(f'{r:.3f}' for r in row['loss_ratios'])}, median "
                  f"{statistics.median(row['loss_ratios']):.3f}); samples per "
                  f"replica (balanced) {row['samples_balanced']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
