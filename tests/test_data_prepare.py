"""``python -m distqat.data prepare`` from a local source: the saved copy loads back the
same examples (the download itself needs internet and is not tested here)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_datasets import cifar_like, data_config, wikitext_like

from distqat.data import DataError, make_task
from distqat.data.__main__ import prepare

ROOT = Path(__file__).resolve().parent.parent


def _same_task(a, b):
    assert a.model_io() == b.model_io()
    for x, y in zip(a.batch(1, 3, 9) + a.eval_set(), b.batch(1, 3, 9) + b.eval_set()):
        assert torch.equal(x, y)


def test_prepare_round_trip_image(tmp_path):
    src = cifar_like(tmp_path / "src", n_train=40, layout="parquet")
    cfg = data_config("image", path=src)
    overrides = prepare(cfg, tmp_path / "out")
    assert overrides == [f"data.path={tmp_path / 'out'}"]
    assert (tmp_path / "out" / "dataset_dict.json").is_file()
    _same_task(make_task(cfg), make_task(data_config("image", path=tmp_path / "out")))
    with pytest.raises(DataError, match="not empty"):
        prepare(cfg, tmp_path / "out")


def test_prepare_round_trip_text_with_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTQAT_CACHE", str(tmp_path / "cache"))
    src = wikitext_like(tmp_path / "src", layout="parquet")
    args = {"seq_len": 12, "subset": "wikitext-2-raw-v1"}
    cfg = data_config("text", path=src, args=args)
    prepare(cfg, tmp_path / "out")
    _same_task(make_task(cfg), make_task(data_config("text", path=tmp_path / "out",
                                                     args=args)))


def test_prepare_refuses_a_task_without_data(tmp_path):
    with pytest.raises(DataError, match="reads no dataset"):
        prepare(data_config("teacher"), tmp_path / "out")


def test_prepare_command_line(tmp_path):
    """Through load_config: needs DataConfig's ``dataset``/``args`` fields and task names."""
    src = cifar_like(tmp_path / "src", n_train=40, layout="parquet")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  name: image\n  dataset: uoft-cs/cifar10\n  path: {src}\n")
    proc = subprocess.run([sys.executable, "-m", "distqat.data", "prepare", "--config",
                           str(config), "--out", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"data.path={tmp_path / 'out'}"
    bad = subprocess.run([sys.executable, "-m", "distqat.data", "prepare", "--config",
                          str(config), "--out", str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not empty" in bad.stderr and "Traceback" not in bad.stderr
