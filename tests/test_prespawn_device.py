"""A device that is not there: one line naming ``device``, exit 2, before any worker."""

import subprocess
import time

import pytest
import torch

from conftest import ROOT, Launcher, tagged_processes
from distqat.config import ConfigError
from distqat.devices import check_device
from distqat.elastic.dist import free_port

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


def _run_watching(launch: Launcher, args, module: str, timeout: float, proc=None):
    """Run ``module`` (or watch ``proc``) and, while it runs, look for any distqat.train
    worker or torchrun agent it started (a check's own ``--print-run-dir`` is no worker)."""
    proc = proc or launch.start(*args, module=module)
    workers = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for p in tagged_processes(launch.tag):
            try:
                cmd = " ".join(p.cmdline())
                if p.pid != proc.pid and ("distqat.train" in cmd or "torchrun" in cmd) \
                        and "--print-run-dir" not in cmd:
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


@pytest.mark.skipif(not NO_CUDA, reason="this host has a CUDA device")
@pytest.mark.timeout(120)
def test_host_sh_exits_2_before_torchrun(tmp_path, launcher):
    """launch/host.sh checks the config before it starts torchrun: a bare torchrun would
    report each worker's exit 2 as a failure of its own (exit 1, a page of output)."""
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "host.sh"), "--rdzv-endpoint",
         f"127.0.0.1:{free_port()}", "device=cuda"], cwd=tmp_path, env=launcher.env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    launcher.procs.append(proc)
    code, out, started = _run_watching(launcher, [], "", timeout=100, proc=proc)
    assert code == 2, out
    assert out.strip().splitlines() == [out.strip()] and "Traceback" not in out, out
    assert out.startswith("distqat: config error: device: 'cuda' asked for"), out
    assert not started, f"torchrun or workers started: {started}"
    assert not (tmp_path / "runs").exists()


def _subnormal_times_one() -> float:
    return (torch.tensor([1e-39]) * 1.0).item()


def _subnormals_on_rpc_threads(rank: int, world: int, flush: bool) -> tuple:
    import torch.distributed.rpc as rpc

    from distqat.config import load_config
    from distqat.devices import configure_cpu

    configure_cpu(load_config(None, [f"flush_denormal={str(flush).lower()}"]))
    rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options=rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{free_port()}", _transports=["uv"]))
    try:
        return _subnormal_times_one(), rpc.rpc_sync("w", _subnormal_times_one)
    finally:
        rpc.shutdown()


@pytest.mark.parametrize("flush", [True, False])
def test_subnormals_are_flushed_on_rpc_threads_too(flush):
    """The stages' optimizer steps run on RPC threads, which inherit the mode only if it
    is set before RPC starts them: Adam's second moments go subnormal and slowed the
    tiny run's step 4x."""
    from mp import run_ranks

    main_thread, rpc_thread = run_ranks(_subnormals_on_rpc_threads, 1, flush, timeout=60)[0]
    expected = 0.0 if flush else pytest.approx(1e-39, rel=1e-3)
    assert main_thread == expected and rpc_thread == expected


def _page_faults_per_step(rank: int, world: int, reuse: bool) -> float:
    """Minor page faults per training step of a 4 x 512 MLP with AdamW, the backward on a
    thread of its own as distributed autograd runs it, after ``configure_cpu``."""
    import resource
    import threading

    from distqat.config import load_config
    from distqat.devices import configure_cpu

    configure_cpu(load_config(None, [f"malloc_reuse={str(reuse).lower()}"]))
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(64, 512)

    def step():
        loss = model(x).square().mean()
        backward = threading.Thread(target=loss.backward)
        backward.start()
        backward.join()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):  # warm-up: the heap and optimizer state reach their size
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30


def test_malloc_reuse_stops_each_step_faulting_its_memory_in_again():
    """glibc hands freed gradients back to the kernel, and the next step's tensors fault
    their pages in again (700-1,100 faults per step here, a 4 MB model's gradients);
    ``malloc_reuse`` keeps them for the next step (a few faults: the thread's stack)."""
    from mp import run_ranks

    kept = run_ranks(_page_faults_per_step, 1, True, timeout=60)[0]
    returned = run_ranks(_page_faults_per_step, 1, False, timeout=60)[0]
    assert kept < 64, f"{kept:.0f} page faults per step with malloc_reuse"
    assert returned > 10 * max(kept, 1.0), (returned, kept)
