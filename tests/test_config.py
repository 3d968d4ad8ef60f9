"""Config: the schema, overrides, and every class of bad input exits 2 naming the field."""

import subprocess
import sys

import pytest

from distqat.config import ConfigError, load_config, to_yaml

from conftest import ROOT


def test_defaults_and_overrides():
    cfg = load_config(None, ["diloco.inner_steps=3", "model_pipeline.num_stages=1",
                             "diloco.inner_optim.lr=0.01"])
    assert cfg.diloco.inner_steps == 3
    assert cfg.model_pipeline.num_stages == 1
    assert cfg.diloco.inner_optim.lr == 0.01
    assert cfg.diloco.outer_optim.nesterov is True
    assert "inner_steps: 3" in to_yaml(cfg)


@pytest.mark.parametrize("overrides, field", [
    (["diloco.inner_stepz=3"], "diloco.inner_stepz"),
    (["nonsense=1"], "nonsense"),
    (["diloco.inner_steps=many"], "diloco.inner_steps"),
    (["diloco.inner_steps=0"], "diloco.inner_steps"),
    (["model_pipeline.num_stages=5"], "model_pipeline.num_stages"),
    (["diloco.inner_optim.name=lion"], "diloco.inner_optim.name"),
    (["mode=sideways"], "mode"),
    (["comm.rpc_transport=shm"], "comm.rpc_transport"),
    (["comm.rpc_channels=mpt"], "comm.rpc_channels"),
    (["comm.lost_after=0"], "comm.lost_after"),
    (["diloco.balance_every=0"], "diloco.balance_every"),
    (["diloco.balance=sometimes"], "diloco.balance"),
    (["diloco.balance=steps", "diloco.inner_steps=4", "diloco.fragments=2"],
     "diloco.balance"),
    (["precision=fp8"], "precision"),
    (["precision=bf16", "dtype=float64"], "precision"),
    (["precision=fp16-mixed"], "precision: fp16-mixed is refused"),
    (["diloco.outer_optim.nesterov=true", "diloco.outer_optim.momentum=0"],
     "diloco.outer_optim.nesterov"),
])
def test_bad_overrides_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_balance_takes_a_mode_and_the_booleans_as_aliases():
    modes = {v: load_config(None, [f"diloco.balance={v}"]).diloco.balance
             for v in ("true", "false", "batch", "Steps", "off")}
    assert modes == {"true": "batch", "false": "off", "batch": "batch", "Steps": "steps",
                     "off": "off"}


def test_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml.*does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("diloco: [1, 2\n  inner: {")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("diloco:\n  inner_steps: 2\n  warp: 9\n")
    with pytest.raises(ConfigError, match="unknown.yaml.*warp"):
        load_config(unknown)


def _cli(*args, module="distqat.local"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["diloco.bogus=1"], "diloco.bogus"),
    (["diloco.inner_steps=abc"], "diloco.inner_steps"),
    (["diloco.inner_steps=0"], "diloco.inner_steps"),
    (["--nproc", "2", "model_pipeline.num_stages=3"], "model_pipeline.num_stages"),
    (["--config", "no/such/file.yaml"], "no/such/file.yaml"),
    (["--config", "{tmp}/broken.yaml"], "broken.yaml"),
    (["model_pipeline.model=nosuchnet"], "model_pipeline.model"),
    (["model_pipeline.model_args.widht=3"], "model_pipeline.model_args"),
])
def test_cli_exits_2_without_traceback(args, needle, tmp_path):
    (tmp_path / "broken.yaml").write_text("diloco: [1, 2\n")
    result = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_train_entry_checks_config_too():
    result = _cli("diloco.inner_steps=0", module="distqat.train")
    assert result.returncode == 2
    assert "diloco.inner_steps" in result.stderr and "Traceback" not in result.stderr


def test_print_config():
    result = _cli("--print-config", "diloco.inner_steps=7")
    assert result.returncode == 0, result.stderr
    assert "inner_steps: 7" in result.stdout
    assert "experiment_prefix: tiny" in result.stdout


def test_config_error_is_reported_before_torch_is_imported():
    # a typo must not cost a torch import (seconds) before the user hears of it
    code = ("import sys\nfrom distqat.local import main\n"
            "try:\n    main(['diloco.inner_steps=0'])\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert "exit 2" in done.stdout, done.stdout + done.stderr
    assert "torch imported: False" in done.stdout, done.stdout
    assert "diloco.inner_steps" in done.stderr and "Traceback" not in done.stderr


def test_a_folder_given_as_config_is_called_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; expected a YAML file"):
        load_config(tmp_path)
