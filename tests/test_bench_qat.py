"""bench/qat.py's helpers and report, without real training runs (a few tiny subprocesses
stand in for distqat.local to check the failure paths)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_qat", ROOT / "bench" / "qat.py")
qat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qat)


def test_median_ratio_points():
    assert qat.median([3.0, 1.0, 2.0]) == 2.0
    assert qat.median([1.0, 2.0]) == 1.5
    with pytest.raises(ValueError):
        qat.median([])
    assert qat.ratio(3.0, 2.0) == 1.5
    assert math.isnan(qat.ratio(1.0, 0.0))
    assert qat.paired_ratios([2.0, 6.0], [1.0, 3.0]) == [2.0, 2.0]
    with pytest.raises(ValueError):
        qat.paired_ratios([1.0], [1.0, 2.0])
    assert qat.points(0.9043) == pytest.approx(90.43)


def test_goal_texts():
    assert qat.goal_text(0.4, 0.5) == "<= 0.5 pt: met"
    assert qat.goal_text(-1.0, 0.5) == "<= 0.5 pt: met"  # better than fp32
    assert qat.goal_text(2.1, 2.0) == "<= 2 pt: MISSED"
    assert qat.goal_text(9.0, None) == "-"
    assert qat.overhead_text(1.29) == "<= 1.3x: met"
    assert qat.overhead_text(1.31) == "<= 1.3x: MISSED"


def test_formatting():
    assert qat.fmt_list([1.0, 2.25], ".1f") == "1.0, 2.2"
    assert qat.signed(0.25) == "+0.2" and qat.signed(-1.0) == "-1.0"
    assert qat.human_bytes(116300) == "116.30 kB"
    assert qat.human_bytes(2_500_000) == "2.50 MB"
    assert qat.human_bytes(12) == "12 B"
    assert qat.table(["a", "b"], [[1, "x"], [2.5, "y"]]) == (
        "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | y |")
    with pytest.raises(ValueError):
        qat.table(["a", "b"], [[1]])


def _summary(acc=0.9, sps=1000.0, evals_on_replica0=True):
    replicas = [
        {"replica": 0, "inner_steps_done": 50, "activation_bytes": 7000 if evals_on_replica0
         else 5000, "gradient_bytes": 5000, "evals": [{"accuracy": acc}] if evals_on_replica0
         else []},
        {"replica": 1, "inner_steps_done": 50, "activation_bytes": 5000,
         "gradient_bytes": 5000, "evals": []},
    ]
    return {"exit_reason": "completed", "inner_steps_done": 50, "outer_steps_done": 5,
            "bytes_allreduced": 1000,
            "activation_bytes": sum(r["activation_bytes"] for r in replicas),
            "gradient_bytes": 10000, "samples_per_s": sps, "loss_last": 1.0,
            "eval_last": {"loss": 0.5, "accuracy": acc, "outer_step": 5}, "replicas": replicas}


def test_bytes_per_step():
    s = _summary()
    assert qat.bytes_per_outer_step(s) == 200
    # replica 0's evaluation forwards are left out of the activation bytes
    assert qat.wire_per_inner_step(s) == (200.0, 200.0)
    one = dict(s, replicas=s["replicas"][:1], activation_bytes=7000, gradient_bytes=5000)
    assert qat.wire_per_inner_step(one) == (140.0, 100.0)


class FakeRunner:
    """Answers run(args, seed) with a made-up summary: W8A8 loses 0.2 points and runs at
    half the speed in the baseline."""

    def __init__(self):
        self.calls = []

    def run(self, args, seed):
        self.calls.append((tuple(args), seed))
        quant = "quant.enable=true" in args
        acc = 0.90 - (0.002 if quant else 0.0) + 0.001 * seed
        slow = 2.0 if quant and "mode=baseline" in args else 1.0
        return _summary(acc=acc, sps=1000.0 / slow)


def test_sections_print_tables(capsys):
    runner = FakeRunner()
    seeds = [0, 1, 2]
    results = qat.accuracy_section(runner, seeds, ["minmax"])
    qat.overhead_section(runner, seeds, ["minmax"], results, ["model_pipeline.model_args.width=64"])
    qat.wire_section(runner, seeds)
    out = capsys.readouterr().out
    assert "| W8A8 | minmax | 89.9 | -0.2 | -0.2, -0.2, -0.2 | <= 0.5 pt: met |" in out
    assert "| fp32 | - | 90.1 |" in out
    assert "| baseline, 1 process | minmax | 1000 | 500 | 2.00 | 2.00, 2.00, 2.00 |" in out
    assert "| baseline, 1 process, model_pipeline.model_args.width=64 | minmax | 1000 | 500 |" in out
    assert "<= 1.3x: MISSED" in out
    assert "| int8 | 200 B | 1.000 |" in out
    # the fp32 pipeline run is made once per seed and shared by the three sections
    assert len(runner.calls) == len(set(runner.calls)) + len(seeds)


def _script(tmp_path, body: str) -> list:
    path = tmp_path / "fake.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_runner_reads_summary_and_reports_failures(tmp_path):
    runner = qat.Runner([], timeout=20, total=3)
    ok = _script(tmp_path, (
        "import json, pathlib\n"
        f"p = pathlib.Path('runs/{qat.PREFIX}'); p.mkdir(parents=True)\n"
        f"(p / 'summary.json').write_text(json.dumps({_summary()!r}))\n"))
    assert runner._run(ok)["samples_per_s"] == 1000.0

    bad = _script(tmp_path, "print('the tail of the output'); raise SystemExit(1)")
    with pytest.raises(RuntimeError, match="the tail of the output"):
        runner._run(bad)

    slow = qat.Runner([], timeout=0.5, total=1)
    hang = _script(tmp_path, "import time; print('started', flush=True); time.sleep(30)")
    with pytest.raises(RuntimeError, match="no result after"):
        slow._run(hang)


def test_count_runs():
    assert qat.count_runs(1, ["minmax"], wide=False) == 1 + 3 + 2 + 3
    assert qat.count_runs(1, ["minmax"], wide=True) == 1 + 3 + 4 + 3
    assert qat.count_runs(3, ["minmax", "lsq"], wide=False) == 3 * (1 + 6 + 3 + 3)
