"""A device that is not there: one line naming ``device``, exit 2, before any worker."""

import time

import pytest
import torch

from conftest import ROOT, Launcher, tagged_processes
from distqat.config import ConfigError
from distqat.devices import check_device

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_are_always_there():
    check_device("cpu")
    check_device("auto")


@pytest.mark.skipif(not NO_CUDA, reason="this host has a CUDA device")
@pytest.mark.parametrize("name", ["cuda", "cuda:3"])
def test_cuda_without_a_gpu_names_the_field_and_torch(name):
    with pytest.raises(ConfigError) as e:
        check_device(name)
    message = str(e.value)
    assert message.startswith(f"device: {name!r} asked for")
    assert torch.__version__ in message and "use device=cpu or auto" in message


def test_other_names_are_refused():
    for name in ("garbage", "cpu:1", "cuda:x" if NO_CUDA else "tpu"):
        with pytest.raises(ConfigError, match=r"^device: "):
            check_device(name)


def _run_watching(launch: Launcher, args, module: str, timeout: float):
    """Run ``module`` and, while it runs, look for any distqat.train worker it started."""
    proc = launch.start(*args, module=module)
    workers = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for p in tagged_processes(launch.tag):
            try:
                if p.pid != proc.pid and "distqat.train" in " ".join(p.cmdline()):
                    workers.add(p.pid)
            except Exception:  # gone meanwhile
                pass
        time.sleep(0.05)
    if proc.poll() is None:
        launch.close()
        pytest.fail(f"{module} ran past {timeout} s")
    out, _ = proc.communicate(timeout=10)
    return proc.returncode, out, workers


@pytest.mark.skipif(not NO_CUDA, reason="this host has a CUDA device")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("module,extra", [("distqat.local", []),
                                          ("distqat.train", []),
                                          ("distqat.train", ["--print-run-dir"])])
def test_cli_exits_2_and_starts_no_worker(tmp_path, launcher, module, extra):
    # distqat.local checks before it launches; distqat.train is what each torchrun worker
    # runs (and --print-run-dir what a launcher can call first to check the config)
    code, out, workers = _run_watching(
        launcher, ["--config", str(ROOT / "configs" / "tiny.yaml"), *extra, "device=cuda"],
        module, timeout=100)
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out, out
    assert lines[0].startswith("distqat: config error: device: 'cuda' asked for"), out
    assert "use device=cpu or auto" in lines[0]
    assert not workers, f"workers started: {workers}"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.timeout(60)
def test_schema_refuses_other_devices_first(tmp_path, launcher):
    for value in ("cuda:3", "mps", "garbage"):
        code, out = launcher.run(f"device={value}", timeout=50)
        assert code == 2, out
        assert out.strip().splitlines() == [
            f"distqat: config error: device: expected one of ['cpu', 'cuda', 'auto'], "
            f"got {value!r}"], out
        assert not (tmp_path / "runs").exists()
