"""A run's TensorBoard files, read back with TensorBoard's own reader: grouped tags, the
job's inner step on every chart, the "distqat" dashboard, the config and the hparams.
(The counters across a kill and restore: tests/test_elastic.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

PREFIXES = ("train/", "eval/", "outer/", "wire/", "fleet/", "hparams/")


def load(folder: Path) -> EventAccumulator:
    """Every event of ``folder`` (all rounds' files; nothing purged when a restarted round
    logs a step again)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0},
                              purge_orphaned_data=False)
    events.Reload()
    return events


def scalars(folder: Path) -> Dict[str, List[Tuple[int, float, float]]]:
    """tag -> [(step, wall time, value)] sorted by step, then time."""
    events = load(folder)
    return {tag: sorted((e.step, e.wall_time, e.value) for e in events.Scalars(tag))
            for tag in events.Tags()["scalars"]}


def check_steps_are_inner_steps(run: Path, inner_steps: int, outer_steps: int) -> None:
    """Every tag is grouped; every step is an inner step of the job, and what happens at
    outer steps (stage figures, rounds) sits on a multiple of ``inner_steps``."""
    total = inner_steps * outer_steps
    for folder in sorted(p for p in run.iterdir() if list(p.glob("events.out.tfevents.*"))):
        for tag, points in scalars(folder).items():
            assert tag.startswith(PREFIXES), (folder.name, tag)
            steps = [step for step, _, _ in points]
            assert all(0 <= s <= total for s in steps), (folder.name, tag, steps)
            if folder.name.startswith(("stage", "fleet")) and not tag.startswith("hparams/"):
                assert all(s % inner_steps == 0 for s in steps), (folder.name, tag, steps)


def check_counters_never_go_back(run: Path) -> None:
    """The wire byte counters are job-cumulative: in step order they only grow, across
    every round that wrote them."""
    found = 0
    for folder in sorted(run.glob("stage*-replica*")):
        for tag, points in scalars(folder).items():
            if tag.startswith("wire/"):
                values = [value for _, _, value in points]
                assert values == sorted(values), (folder.name, tag, points)
                found += 1
    assert found, f"no wire/ counters under {run}"


@pytest.mark.timeout(300)
def test_tags_dashboard_config_and_hparams(runs):
    code, out, launcher = runs.get("--nproc", "4")
    assert code == 0, out[-4000:]
    run = launcher.cwd / "runs" / "tiny"
    replica = scalars(run / "replica0")
    for tag in ("train/loss", "train/samples_per_s", "train/inner_step_s", "outer/wait_s",
                "eval/loss", "eval/accuracy"):
        assert tag in replica, sorted(replica)
    assert "train/loss" in scalars(run / "replica1")
    stage = scalars(run / "stage1-replica0")
    for tag in ("outer/step_s", "outer/pseudo_grad_norm", "wire/allreduce_bytes",
                "wire/activation_bytes", "wire/gradient_bytes"):
        assert tag in stage, sorted(stage)
    assert [s for s, _, _ in stage["outer/step_s"]] == list(range(10, 201, 10))
    assert stage["wire/allreduce_bytes"][-1][2] > 0
    check_steps_are_inner_steps(run, inner_steps=10, outer_steps=20)
    check_counters_never_go_back(run)

    fleet = load(run / "fleet")
    assert {"fleet/world_size", "fleet/complete_pipelines", "fleet/restarts"} <= \
        set(fleet.Tags()["scalars"])
    assert fleet.Scalars("fleet/world_size")[-1].value == 4
    # the dashboard: TensorBoard's custom-scalars plugin reads this layout
    (layout_event,) = fleet.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(layout_event.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "distqat"
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert charts["loss (each replica)"] == [r"^train/loss$"]
    assert any("wire" in t for tags in charts.values() for t in tags)
    # the config as text, the hparams with the final metrics
    assert "config/text_summary" in fleet.Tags()["tensors"]
    text = fleet.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "inner_steps: 10" in text and "num_stages: 2" in text
    plugins = fleet.PluginTagToContent("hparams")
    assert set(plugins) >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    summary = launcher.summary()
    assert fleet.Scalars("hparams/loss_last")[-1].value == pytest.approx(summary["loss_last"])
    assert "hparams/eval_accuracy" in fleet.Tags()["scalars"]
