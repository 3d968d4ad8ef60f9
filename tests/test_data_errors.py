"""Data that is not there or not readable: one-line errors naming what to do, at once."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_datasets import cifar_like, data_config, speech_like

from distqat.data import DataError, check_data, make_task

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys, time
sys.path.insert(0, {tests!r})
from hub_datasets import data_config
from distqat.data import DataError, {call}
start = time.monotonic()
try:
    {call}(data_config("image", dataset="uoft-cs/cifar10"))
except DataError as e:
    print(f"{{time.monotonic() - start:.2f}}")
    print(e)
"""


@pytest.mark.parametrize("offline_env", [False, True])
@pytest.mark.parametrize("call", ["make_task", "check_data"])
def test_missing_hub_dataset_fails_fast_with_both_ways(tmp_path, offline_env, call):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    if offline_env:
        env["HF_HUB_OFFLINE"] = "1"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PROBE.format(tests=str(ROOT / "tests"),
                                                              call=call)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    wall = time.monotonic() - started
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr
    seconds, message = float(lines[0]), lines[1]
    assert seconds < 10 and wall < 30, (seconds, wall)
    assert "'uoft-cs/cifar10'" in message
    assert str(tmp_path / "hf") in message  # the hub cache that was looked in
    assert "python -m distqat.data prepare --config" in message and "data.path=DIR" in message


def test_missing_path_names_dataset_and_both_ways(tmp_path):
    cfg = data_config("image", dataset="uoft-cs/cifar10", path=tmp_path / "nowhere")
    for call in (make_task, check_data):
        with pytest.raises(DataError) as e:
            call(cfg)
        message = str(e.value)
        assert "\n" not in message and "'uoft-cs/cifar10'" in message
        assert str(tmp_path / "nowhere") in message and "distqat.data prepare" in message


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return {layout: cifar_like(root / layout, n_train=40, layout=layout)
            for layout in ("parquet", "disk")}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_parquet_file_is_named(cifar, tmp_path):
    root = _copy(cifar["parquet"], tmp_path / "c")
    bad = next(root.rglob("test-*.parquet"))
    bad.write_bytes(b"PAR1 this is not a parquet file")
    for call in (check_data, make_task):
        with pytest.raises(DataError, match=str(bad)):
            call(data_config("image", path=root))


def test_corrupt_arrow_file_is_named(cifar, tmp_path):
    root = _copy(cifar["disk"], tmp_path / "d")
    bad = next((root / "train").glob("*.arrow"))
    bad.write_bytes(bad.read_bytes()[:100])
    for call in (check_data, make_task):
        with pytest.raises(DataError, match=str(bad)):
            call(data_config("image", path=root))


def test_corrupt_image_and_audio_rows_are_named(tmp_path):
    from datasets import load_from_disk
    for name, writer, column, args in (("image", cifar_like, "img", {}),
                                       ("audio", speech_like, "audio", {"num_samples": 800})):
        splits = load_from_disk(str(writer(tmp_path / name, n_train=40, layout="disk")))
        broken = {"bytes": b"garbage", "path": None}
        if name == "image":
            from datasets import Image
            train = splits["train"].cast_column(column, Image(decode=False))
        else:
            train = splits["train"]
        train = train.map(lambda row, i: {column: broken} if i == 3 else {}, with_indices=True)
        train.save_to_disk(str(tmp_path / f"{name}-bad"))
        task = make_task(data_config(name, path=tmp_path / f"{name}-bad", args=args,
                                     eval_samples=5))
        with pytest.raises(DataError, match=r"row 3: not a readable"):
            task.train_examples([3], None)


def test_missing_column_and_split_name_the_setting(cifar):
    for call in (check_data, make_task):
        with pytest.raises(DataError, match=r"no column 'image' \(data\.args\.image_column\)"):
            call(data_config("image", path=cifar["parquet"], args={"image_column": "image"}))
    with pytest.raises(DataError, match=r"data\.args\.eval_split: .* no split 'dev'"):
        make_task(data_config("image", path=cifar["disk"], args={"eval_split": "dev"}))


def test_empty_folder_and_wrong_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        check_data(data_config("image", path=tmp_path / "empty"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match="x.bin"):
        check_data(data_config("image", path=tmp_path / "x.bin"))


@pytest.mark.timeout(120)
def test_cli_exits_2_before_any_worker_starts(tmp_path):
    # offline, nothing cached: the shipped CIFAR config names its dataset and both ways;
    # a data.path that does not exist names the path. No worker is started (no runs/).
    from conftest import ROOT

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    for extra, named in (([], "uoft-cs/cifar10"), ([f"data.path={tmp_path / 'nope'}"], "nope")):
        done = subprocess.run([sys.executable, "-m", "distqat.local", "--config",
                               str(ROOT / "configs" / "resnet18.yaml"), *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
        assert done.returncode == 2, done.stderr
        assert named in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "distqat.data prepare" in done.stderr and "data.path" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "runs").exists()
