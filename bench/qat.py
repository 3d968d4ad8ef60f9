"""Quantization-aware training on real data: accuracy, step-time overhead, wire compression.

    python bench/qat.py [--repeats 3] [--model cnn|mlp] [--outer-steps 30] [--lsq] [--wide 64] [--quick]

Every figure comes from real runs of ``python -m distqat.local`` in a temporary directory,
read back from ``runs/qat/summary.json``. Task: ``data.name=digits`` (real 8x8 handwritten
digits shipped with distqat; ``data.eval_samples`` = 512 held out, so one image is 0.2
points of accuracy). Pipeline runs: ``--nproc 4`` = 2 stages x 2 replicas kept together by
DiLoCo, 1 thread per worker. Each configuration runs ``--repeats`` times with
``seed=0, 1, ...`` (the model's initialization; the data split and order stay fixed), and
the runs of one seed are made back to back so that pairs share the machine's state.
Checkpoints are off (``param_mirror.enable=false``) and the held-out set is evaluated only
before and after training, so that samples/s measures training.

1. Accuracy (``eval_last``: replica 0 after the last outer step) and final training loss
   of fp32, W8A8, W4A8 and W4A4 (``quant.method=minmax``; ``--lsq`` adds ``lsq``), with the
   difference to fp32 in points. Goals: W8A8 within 0.5 points of fp32, W4A8 within 2.
2. QAT step-time overhead: samples/s fp32 / samples/s W8A8 (= step time W8A8 / fp32), in
   the pipeline and in ``mode=baseline`` (the full model in one process: fake-quant cost
   without RPC), and in ``mode=baseline`` with the layers made ``--wide`` (how the
   overhead changes when each layer has more arithmetic). Goal <= 1.3x.
3. Compressed wire, quantization off: ``quant.wire.pseudo_grads`` fp32 | bf16 | int8
   (payload per outer step, all stage hosts) and ``quant.wire.activations=int8``
   (activation and gradient bytes per inner step, all replicas, training only).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "qat"
DATASET = ("UCI Optical Recognition of Handwritten Digits, test set (1797 8x8 images, "
           "10 classes; E. Alpaydin, C. Kaynak, 1998), via scikit-learn's bundled copy, "
           "shipped in distqat/data/files/digits.csv.gz")
PIPELINE = ["--nproc", "4", "model_pipeline.num_stages=2"]
BASELINE = ["mode=baseline"]
GOALS = {"W8A8": 0.5, "W4A8": 2.0}  # max accuracy drop vs fp32, in points
OVERHEAD_GOAL = 1.3

# (label, overrides); the fp32 entry is also the fp32 wire reference of section 3
FP32 = ("fp32", ["quant.enable=false"])
QUANT = {
    "W8A8": ["quant.enable=true", "quant.weight_bits=8", "quant.activation_bits=8"],
    "W4A8": ["quant.enable=true", "quant.weight_bits=4", "quant.activation_bits=8"],
    "W4A4": ["quant.enable=true", "quant.weight_bits=4", "quant.activation_bits=4"],
}
PSEUDO_GRADS = ("fp32", "bf16", "int8")


# ---------------------------------------------------------------- pure helpers (tested)

def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return statistics.median(values)


def ratio(num: float, den: float) -> float:
    """num / den; nan when den is 0 (a run that reported no throughput)."""
    return num / den if den else float("nan")


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> List[float]:
    """num[i] / den[i] seed by seed."""
    if len(num) != len(den):
        raise ValueError(f"unpaired runs: {len(num)} vs {len(den)}")
    return [ratio(a, b) for a, b in zip(num, den)]


def points(accuracy: float) -> float:
    """An accuracy in [0, 1] as percentage points."""
    return 100.0 * accuracy


def goal_text(drop: float, limit: Optional[float]) -> str:
    """Whether an accuracy drop (fp32 - quantized, points) is within ``limit``."""
    if limit is None:
        return "-"
    return f"<= {limit:g} pt: {'met' if drop <= limit else 'MISSED'}"


def overhead_text(value: float, limit: float = OVERHEAD_GOAL) -> str:
    return f"<= {limit:g}x: {'met' if value <= limit else 'MISSED'}"


def fmt_list(values: Sequence[float], spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)


def signed(value: float, spec: str = ".1f") -> str:
    return format(value, "+" + spec)


def human_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; every row must have one cell per header."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells, expected {len(headers)}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bytes_per_outer_step(summary: dict) -> float:
    return ratio(summary["bytes_allreduced"], summary["outer_steps_done"])


def wire_per_inner_step(summary: dict) -> Tuple[float, float]:
    """(activation, gradient) bytes per inner step, all replicas, training hops only.

    Replica 0's ``activation_bytes`` also count its held-out evaluation forwards, so the
    activation figure is taken from the replicas that do not evaluate (scaled to all
    replicas); with a single replica it falls back to the total."""
    steps = summary["inner_steps_done"]
    replicas = summary.get("replicas") or []
    quiet = [r for r in replicas if not r.get("evals")]
    if quiet and len(replicas) > len(quiet):
        act = statistics.fmean(r["activation_bytes"] / r["inner_steps_done"] for r in quiet)
        act *= len(replicas)
    else:
        act = ratio(summary["activation_bytes"], steps)
    return act, ratio(summary["gradient_bytes"], steps)


# ---------------------------------------------------------------- runs

class Runner:
    """Runs ``python -m distqat.local`` with the common arguments; each (overrides, seed)
    once (section 3 reuses section 1's fp32 runs, section 2 its fp32 and W8A8 runs)."""

    def __init__(self, common: List[str], timeout: float, total: int):
        self.common = common
        self.timeout = timeout
        self.cache: Dict[Tuple[str, ...], dict] = {}
        self.done, self.total = 0, total

    def command(self, args: Sequence[str], seed: int) -> List[str]:
        return [sys.executable, "-m", "distqat.local", *args, *self.common, f"seed={seed}"]

    def run(self, args: Sequence[str], seed: int) -> dict:
        key = tuple(args) + (f"seed={seed}",)
        if key not in self.cache:
            self.cache[key] = self._run(self.command(args, seed))
        return self.cache[key]

    def runs(self, args: Sequence[str], seeds: Sequence[int]) -> List[dict]:
        return [self.run(args, s) for s in seeds]

    def _run(self, cmd: List[str]) -> dict:
        self.done += 1
        shown = " ".join(cmd[1:])
        print(f"[{self.done}/{self.total}] python {shown}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, DISTQAT_NO_PROGRESS="1", OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                               os.environ.get("PYTHONPATH")])))
            # a session of its own, so that a timeout ends the launcher and its workers
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                raise RuntimeError(f"{shown}: no result after {self.timeout:.0f} s; output "
                                   f"tail:\n{out[-4000:]}") from None
            path = Path(tmp) / "runs" / PREFIX / "summary.json"
            summary = json.loads(path.read_text()) if path.is_file() else None
        if proc.returncode != 0 or summary is None or summary.get("exit_reason") != "completed":
            reason = summary.get("exit_reason") if summary else "no summary.json"
            raise RuntimeError(f"{shown} failed (status {proc.returncode}, {reason}); output "
                               f"tail:\n{out[-4000:]}")
        if not summary.get("eval_last"):
            raise RuntimeError(f"{shown}: summary.json has no eval_last")
        print(f"    {time.perf_counter() - t0:.0f} s, accuracy "
              f"{points(summary['eval_last']['accuracy']):.1f}, "
              f"{summary['samples_per_s']:.0f} samples/s", file=sys.stderr, flush=True)
        return summary


def acc_of(runs: List[dict]) -> List[float]:
    return [points(r["eval_last"]["accuracy"]) for r in runs]


def sps_of(runs: List[dict]) -> List[float]:
    return [r["samples_per_s"] for r in runs]


# ---------------------------------------------------------------- sections

def accuracy_section(runner: Runner, seeds: List[int], methods: List[str]) -> dict:
    variants = [(FP32[0], "-", PIPELINE + FP32[1])]
    for method in methods:
        for name, over in QUANT.items():
            variants.append((name, method, PIPELINE + over + [f"quant.method={method}"]))
    results = {}
    for seed in seeds:  # seed by seed: the runs of a pair are made back to back
        for name, method, args in variants:
            results.setdefault((name, method), []).append(runner.run(args, seed))
    base_acc = acc_of(results[("fp32", "-")])
    rows = []
    for name, method, _ in variants:
        runs = results[(name, method)]
        acc = acc_of(runs)
        drop = median(base_acc) - median(acc)
        is_ref = name == "fp32"
        rows.append([
            name, method, f"{median(acc):.1f}",
            "-" if is_ref else signed(-drop),
            "-" if is_ref else fmt_list([a - b for a, b in zip(acc, base_acc)], "+.1f"),
            "-" if is_ref else goal_text(drop, GOALS.get(name)),
            f"{median([r['loss_last'] for r in runs]):.4f}",
            f"{median([r['eval_last']['loss'] for r in runs]):.4f}",
            fmt_list(acc, ".1f"), fmt_list([r["loss_last"] for r in runs], ".3f")])
    print("## 1. Accuracy on the held-out digits (pipeline 2 stages x 2 replicas)\n")
    print(table(["config", "method", "accuracy % (median)", "vs fp32 (pt, medians)",
                 "vs fp32 per seed (pt)", "goal", "final train loss (median)",
                 "eval loss (median)", "accuracy per run", "train loss per run"], rows))
    print(flush=True)
    return results


def overhead_section(runner: Runner, seeds: List[int], methods: List[str],
                     pipeline_runs: dict, wide_args: List[str]) -> None:
    rows = []
    for method in methods:
        w8 = QUANT["W8A8"] + [f"quant.method={method}"]
        paths = [("pipeline 2x2, RPC", PIPELINE, pipeline_runs[("fp32", "-")],
                  pipeline_runs[("W8A8", method)]),
                 ("baseline, 1 process", BASELINE, None, None)]
        if wide_args:  # the same layers made wider: how the overhead scales with compute
            paths.append((f"baseline, 1 process, {' '.join(wide_args)}",
                          BASELINE + wide_args, None, None))
        for path, prefix, fp32_runs, q_runs in paths:
            if fp32_runs is None:
                fp32_runs, q_runs = [], []
                for seed in seeds:
                    fp32_runs.append(runner.run(prefix + FP32[1], seed))
                    q_runs.append(runner.run(prefix + w8, seed))
            f, q = sps_of(fp32_runs), sps_of(q_runs)
            over = ratio(median(f), median(q))
            rows.append([path, method, f"{median(f):.0f}", f"{median(q):.0f}", f"{over:.2f}",
                         fmt_list(paired_ratios(f, q), ".2f"), overhead_text(over),
                         fmt_list(f, ".0f"), fmt_list(q, ".0f")])
    print("## 2. QAT step-time overhead: W8A8 step time / fp32 step time\n")
    print("samples/s is summary.json's (training time only: inner steps and outer-step "
          "waits, all replicas); ratio = samples/s fp32 / samples/s W8A8.\n")
    print(table(["path", "method", "fp32 samples/s (median)", "W8A8 samples/s (median)",
                 "ratio (medians)", "ratio per seed", "goal", "fp32 runs", "W8A8 runs"], rows))
    print(flush=True)


def wire_section(runner: Runner, seeds: List[int]) -> None:
    off = PIPELINE + FP32[1]
    results = {fmt: [] for fmt in PSEUDO_GRADS}
    act_int8 = []
    for seed in seeds:
        for fmt in PSEUDO_GRADS:
            extra = [] if fmt == "fp32" else [f"quant.wire.pseudo_grads={fmt}"]
            results[fmt].append(runner.run(off + extra, seed))
        act_int8.append(runner.run(off + ["quant.wire.activations=int8"], seed))

    ref_bytes = median([bytes_per_outer_step(r) for r in results["fp32"]])
    rows = []
    for fmt in PSEUDO_GRADS:
        runs = results[fmt]
        per_outer = median([bytes_per_outer_step(r) for r in runs])
        rows.append([fmt, human_bytes(per_outer), f"{ratio(per_outer, ref_bytes):.3f}",
                     f"{median(acc_of(runs)):.1f}",
                     f"{median([r['eval_last']['loss'] for r in runs]):.4f}",
                     f"{median([r['loss_last'] for r in runs]):.4f}",
                     fmt_list(acc_of(runs), ".1f")])
    print("## 3. Compressed wire (quant.enable=false: only the wire changes)\n")
    print("Pseudo-gradients: payload each stage host hands to its outer-step collectives, "
          "summed over stage hosts, per outer step (fp32: all-reduce; bf16/int8: "
          "all-gather, int8 with one scale per quant.wire.chunk_size elements).\n")
    print(table(["quant.wire.pseudo_grads", "bytes / outer step", "vs fp32",
                 "accuracy % (median)", "eval loss (median)", "final train loss (median)",
                 "accuracy per run"], rows))
    print()

    rows = []
    ref_act = None
    for fmt, runs in (("fp32", results["fp32"]), ("int8", act_int8)):
        act = median([wire_per_inner_step(r)[0] for r in runs])
        grad = median([wire_per_inner_step(r)[1] for r in runs])
        ref_act = act + grad if ref_act is None else ref_act
        rows.append([fmt, human_bytes(act), human_bytes(grad), human_bytes(act + grad),
                     f"{ratio(act + grad, ref_act):.3f}", f"{median(acc_of(runs)):.1f}",
                     f"{median([r['eval_last']['loss'] for r in runs]):.4f}",
                     f"{median([r['loss_last'] for r in runs]):.4f}",
                     fmt_list(acc_of(runs), ".1f")])
    print("Activations between stages (and the logits back to the driver) forward, their "
          "gradients backward; per inner step, all replicas, training only (int8: one "
          "scale per row).\n")
    print(table(["quant.wire.activations", "activation bytes / inner step",
                 "gradient bytes / inner step", "total", "vs fp32", "accuracy % (median)",
                 "eval loss (median)", "final train loss (median)", "accuracy per run"], rows))
    print(flush=True)


def count_runs(repeats: int, methods: List[str], wide: bool) -> int:
    """Distinct runs the benchmark makes (for the progress lines)."""
    accuracy = 1 + len(QUANT) * len(methods)
    baseline = (1 + len(methods)) * (2 if wide else 1)
    wire = 3  # pseudo_grads bf16, int8; activations int8
    return repeats * (accuracy + baseline + wire)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="runs per config (3)")
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--outer-steps", type=int, default=None, help="DiLoCo outer steps (30)")
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--lsq", action="store_true", help="also quant.method=lsq")
    parser.add_argument("--wide", type=int, default=64, metavar="W",
                        help="also measure the overhead with the model's width set to W "
                             "(cnn: model_args.width, default 16; mlp: hidden, default "
                             "128); 0: skip")
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, 5 outer steps: checks that the script works")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    outer = args.outer_steps if args.outer_steps is not None else (5 if args.quick else 30)
    if repeats < 1 or outer < 1 or args.inner_steps < 1:
        parser.error("--repeats, --outer-steps and --inner-steps must be >= 1")
    seeds = list(range(repeats))
    methods = ["minmax"] + (["lsq"] if args.lsq else [])
    common = [f"experiment_prefix={PREFIX}", "data.name=digits",
              f"model_pipeline.model={args.model}", f"diloco.outer_steps={outer}",
              f"diloco.inner_steps={args.inner_steps}", "diloco.batch_size_per_step=64",
              f"eval_every={outer}",
              "log_every=1000", "param_mirror.enable=false", "comm.threads_per_worker=1"]
    width_key = {"cnn": "width", "mlp": "hidden"}[args.model]
    wide_args = [f"model_pipeline.model_args.{width_key}={args.wide}"] if args.wide > 0 else []
    runner = Runner(common, args.timeout, count_runs(repeats, methods, bool(wide_args)))

    started = time.perf_counter()
    print(f"# bench/qat.py: QAT on real digits, {args.model}, {repeats} run(s) per config "
          f"(seed={', '.join(map(str, seeds))}), medians\n")
    print(f"Data: {DATASET}; 512 images held out (data.eval_samples), 1285 for training; "
          f"one held-out image = 0.2 points.\n")
    given = sys.argv[1:] if argv is None else list(argv)
    print(f"Command: `{' '.join(['python', 'bench/qat.py', *given])}`")
    print(f"\nEach run: `python -m distqat.local {' '.join(PIPELINE)} {' '.join(common)} "
          f"seed=S [config]` (baseline: `mode=baseline` instead of `--nproc 4 ...`), "
          f"{outer} outer x {args.inner_steps} inner steps of "
          f"64 samples per replica. torch {importlib.metadata.version('torch')}, "
          f"{os.cpu_count()} CPU cores.\n", flush=True)

    pipeline_runs = accuracy_section(runner, seeds, methods)
    overhead_section(runner, seeds, methods, pipeline_runs, wide_args)
    wire_section(runner, seeds)
    print(f"{runner.done} runs, {time.perf_counter() - started:.0f} s in all.")


if __name__ == "__main__":
    main()
