"""Export a trained run as integer weights plus scales, and load it back for evaluation.

    python -m distqat.export RUN_DIR OUT.safetensors

RUN_DIR is ``runs/<experiment_prefix>`` of a finished run: its ``config.yaml`` and the
trained stages in ``final/``. OUT is one safetensors file (``distqat.quant.export``'s
layout) whose metadata also carries the run's config, so :func:`load` needs nothing else:
it rebuilds the model with its quantizers, installs the integer weights and the scales,
and returns it in eval mode. Its outputs equal those of the fake-quant model the run
trained (same arithmetic: ``(q - zp) * scale``, then the layer's float op).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from .config import CONFIG_FILE, Config, ConfigError, config_from_yaml, load_config, to_yaml
from .fileio import read_json
from .pipeline.build import IO_FILE, build_stages
from .quant import load_into, read_export, save_export

CONFIG_KEY = "run_config"
IO_KEY = "model_io"


class ExportError(ValueError):
    """A run folder or export file that cannot be used; the message names it."""


def _run_config(run_dir: Path) -> Config:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{run_dir}: no {CONFIG_FILE}; expected the folder of a finished "
                          f"run (runs/<experiment_prefix>)")
    try:
        return load_config(path)
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from None


def trained_model(run_dir: Path) -> tuple[Config, dict, nn.Sequential]:
    """The run's config, its model's io, and the whole model (with its quantizers)
    holding the trained weights of ``final/``."""
    cfg = _run_config(run_dir)
    io = read_json(run_dir / IO_FILE)
    if io is None:
        raise ExportError(f"{run_dir}: no {IO_FILE}; expected the folder of a finished run")
    stages = build_stages(cfg, io)
    final = run_dir / "final"
    names = ["full.pt"] if cfg.mode == "baseline" else [f"stage{s}.pt" for s in sorted(stages)]
    for s, name in zip(sorted(stages), names):
        if not (final / name).is_file():
            raise ExportError(f"{final / name}: missing; did the run finish?")
        stages[s].load_state_dict(torch.load(final / name, map_location="cpu", weights_only=True))
    return cfg, io, nn.Sequential(*[b for s in sorted(stages) for b in stages[s]])


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's trained model as integers + scales to ``out``; returns ``out``."""
    cfg, io, model = trained_model(Path(run_dir))
    out = Path(out)
    save_export(out, model.float(), metadata={CONFIG_KEY: to_yaml(cfg), IO_KEY: json.dumps(io)})
    return out


def load(path: str | Path) -> nn.Module:
    """The exported model, ready to evaluate (eval mode, float32)."""
    _, metadata = read_export(path)  # checks the checksum: a damaged file stops here
    if CONFIG_KEY not in metadata or IO_KEY not in metadata:
        raise ExportError(f"{path}: no distqat config in its metadata; not written by "
                          f"distqat.export")
    cfg = config_from_yaml(metadata[CONFIG_KEY], f"{path} (its config)")
    stages = build_stages(cfg, json.loads(metadata[IO_KEY]))
    model = nn.Sequential(*[b for s in sorted(stages) for b in stages[s]]).float()
    load_into(model, path)
    return model.eval()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distqat.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="runs/<experiment_prefix> of a finished run")
    parser.add_argument("out", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out)
    except (ExportError, ValueError) as e:
        print(f"distqat.export: {e}", file=sys.stderr)
        return 2
    print(f"distqat.export: wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
