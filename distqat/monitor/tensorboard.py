"""TensorBoard for a run: one folder per source, tags grouped by what they measure, and one
"distqat" dashboard.

Runs (subfolders of ``runs/<experiment_prefix>``): ``replica<r>/`` (a driver's view of its
replica), ``stage<s>-replica<r>/`` (a stage host's), ``fleet/`` (the job's rounds and
recoveries, kept by replica 0's driver; also the config as text, the dashboard's layout,
and at the end the hparams with the final metrics).

Tags, by prefix: ``train/`` (loss, samples/s, step times), ``eval/`` (the task's
metrics), ``outer/`` (the outer step: the driver's wait, the stage's all-reduce time, the
pseudo-gradient norm), ``wire/`` (bytes: activations, gradients, all-reduce),
``fleet/`` (world size, complete pipelines, restarts, recoveries).

One step unit everywhere: the job's inner step (a stage's outer step k is logged at inner
step k x inner_steps; a round at the inner step it resumes from), so every chart lines up.
The byte counters are job-cumulative: a stage's checkpoint carries them, so a resumed round
goes on from the value at the outer step it resumes from and a counter never goes back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

LAYOUT = {"distqat": {
    "loss (each replica)": ["Multiline", [r"^train/loss$"]],
    "eval (replica 0)": ["Multiline", [r"^eval/"]],
    "samples/s (each replica)": ["Multiline", [r"^train/samples_per_s$"]],
    "batch size (each replica; diloco.balance)": ["Multiline", [r"^train/batch_size$"]],
    "outer step: wait and all-reduce (s)": ["Multiline", [r"^outer/wait_s$", r"^outer/step_s$"]],
    "bytes on the wire (cumulative)": ["Multiline", [r"^wire/"]],
    "fleet: world size and pipelines": ["Multiline", [r"^fleet/world_size$",
                                                      r"^fleet/complete_pipelines$"]],
    "restarts and recoveries": ["Multiline", [r"^fleet/restarts$", r"^fleet/recovery_s$",
                                              r"^fleet/steps_lost$"]],
}}


class Scalars:
    """A lazily opened TensorBoard writer for one subfolder of the run (a worker that
    never logs leaves no empty event file behind; torch's writer is imported only then)."""

    def __init__(self, run_path: Path, name: str):
        self.path = run_path / name
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path))
        return self._writer

    def add(self, group: str, step: int, **values: float) -> None:
        """``values`` as ``group/<name>`` at ``step`` (the job's inner step)."""
        for key, value in values.items():
            self.writer.add_scalar(f"{group}/{key}", value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def layout(self) -> None:
        """The "distqat" custom-scalars dashboard (TensorBoard merges it across runs)."""
        self.writer.add_custom_scalars(LAYOUT)

    def hparams(self, hparams: Dict[str, Any], metrics: Dict[str, float], step: int) -> None:
        """The run's hyperparameters with its final metrics (the HPARAMS tab), in this
        writer's own folder (torch's ``add_hparams`` would open another one)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        experiment, start, end = hparams_summary(hparams, metrics)
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def config_text(yaml_text: str) -> str:
    """The resolved config as TensorBoard's markdown shows it (indented: a code block)."""
    return "\n".join("    " + line for line in yaml_text.splitlines())


def run_hparams(cfg) -> Dict[str, Any]:
    """What distinguishes one run from another, flat, as the HPARAMS tab wants it."""
    d, mp, q = cfg.diloco, cfg.model_pipeline, cfg.quant
    return {"model": mp.model, "num_stages": mp.num_stages, "num_microbatches": mp.num_microbatches,
            "inner_steps": d.inner_steps, "outer_steps": d.outer_steps,
            "batch_size_per_step": d.batch_size_per_step, "inner_lr": d.inner_optim.lr,
            "outer_lr": d.outer_optim.lr, "data": cfg.data.name,
            "wire_activations": q.wire.activations, "wire_pseudo_grads": q.wire.pseudo_grads,
            "qat": q.enable, "weight_bits": q.weight_bits if q.enable else 32,
            "dtype": cfg.dtype, "schedule": mp.schedule, "fragments": d.fragments}


def final_metrics(summary: Dict[str, Any]) -> Dict[str, float]:
    """The summary's final figures as hparams metrics (``hparams/...``)."""
    metrics = {f"hparams/{k}": float(summary[k]) for k in
               ("loss_last", "samples_per_s", "outer_steps_done") if summary.get(k) is not None}
    for key, value in (summary.get("eval_last") or {}).items():
        if isinstance(value, (int, float)) and key != "outer_step":
            metrics[f"hparams/eval_{key}"] = float(value)
    return metrics
