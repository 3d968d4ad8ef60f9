"""Checkpoint format, atomicity under SIGKILL, fallback past damaged files, the writer."""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import distqat
from distqat import checkpoint as ckpt
from distqat.checkpoint import store as ckpt_store
from distqat.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    checkpoint_path,
    latest,
    list_checkpoints,
    load_latest,
    load_verified,
    save,
    save_atomic,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(distqat.__file__).resolve().parent.parent
LOGGER = "distqat.checkpoint"


def assert_same(a, b, where="state"):
    """Exact equality, recursing into containers; tensors by value, dtype and shape."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def diloco_state(step: int, stage: int = 0):
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    return {
        "stage": stage,
        "outer_step": step,
        "global_params": [p.detach().clone() for p in model.parameters()],
        "outer_optim": opt.state_dict(),
        "data_position": {"epoch": 1, "offset": 12345, "shards": [3, 4]},
        "lr": 0.7,
    }


def tmp_files(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- format


def test_round_trip_exact(tmp_path):
    state = diloco_state(7)
    assert all(
        "momentum_buffer" in s and s["momentum_buffer"] is not None
        for s in state["outer_optim"]["state"].values()
    )
    path = save(tmp_path, 0, 7, state, keep=2)
    assert path == tmp_path / "stage0-step00000007.pt"
    assert_same(load_verified(path), state)
    assert_same(load_latest(tmp_path, 0), (7, state))
    assert latest(tmp_path, 0) == (7, path)
    # The header: magic, version, length, sha256.
    raw = path.read_bytes()
    assert raw[:8] == ckpt.MAGIC and len(raw) > ckpt.HEADER_SIZE

    # The restored optimizer state dict loads into a fresh optimizer.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    opt.load_state_dict(load_verified(path)["outer_optim"])
    assert opt.param_groups[0]["lr"] == 0.7


def test_save_atomic_any_path(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    save_atomic(target, {"a": torch.arange(3), "b": (1, "two", None)})
    assert_same(load_verified(target), {"a": torch.arange(3), "b": (1, "two", None)})
    assert tmp_files(target.parent) == []


def test_missing_folder_and_empty(tmp_path):
    assert list_checkpoints(tmp_path / "nope", 0) == []
    assert latest(tmp_path / "nope", 0) is None
    assert load_latest(tmp_path, 0) is None


def test_keep_last_k_per_stage(tmp_path):
    # Stages 1 and 10 share the folder and must not be touched by stage 0's pruning.
    save(tmp_path, 1, 1, {"x": 1}, keep=3)
    save(tmp_path, 10, 1, {"x": 10}, keep=3)
    for step in range(1, 7):
        save(tmp_path, 0, step, {"x": step}, keep=3)
    assert list_checkpoints(tmp_path, 0) == [4, 5, 6]
    assert list_checkpoints(tmp_path, 1) == [1]
    assert list_checkpoints(tmp_path, 10) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "stage0-step00000004.pt",
        "stage0-step00000005.pt",
        "stage0-step00000006.pt",
        "stage1-step00000001.pt",
        "stage10-step00000001.pt",
    ]


def test_keep_never_deletes_the_file_just_written(tmp_path):
    # A lagging writer saves an older step after newer ones exist: it stays.
    for step in (5, 6, 7):
        save(tmp_path, 0, step, {"x": step}, keep=2)
    save(tmp_path, 0, 3, {"x": 3}, keep=2)
    assert list_checkpoints(tmp_path, 0) == [3, 6, 7]


# ----------------------------------------------------------------------------- damage


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_payload_byte(path: Path):
    data = bytearray(path.read_bytes())
    i = ckpt.HEADER_SIZE + (len(data) - ckpt.HEADER_SIZE) // 2
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def damage_magic(path: Path):
    data = bytearray(path.read_bytes())
    data[0:4] = b"XXXX"
    path.write_bytes(bytes(data))


def empty(path: Path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [truncate, flip_payload_byte, damage_magic, empty])
def test_damaged_newest_falls_back(tmp_path, caplog, damage):
    for step in (1, 2, 3):
        save(tmp_path, 0, step, diloco_state(step), keep=5)
    newest = checkpoint_path(tmp_path, 0, 3)
    damage(newest)

    with pytest.raises(CheckpointError, match=newest.name):
        load_verified(newest)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = load_latest(tmp_path, 0)
    assert got is not None
    assert_same(got, (2, diloco_state(2)))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and newest.name in warnings[0].getMessage()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert latest(tmp_path, 0) == (2, checkpoint_path(tmp_path, 0, 2))
    assert any(newest.name in r.getMessage() for r in caplog.records)


def test_all_damaged_returns_none_with_a_warning_per_file(tmp_path, caplog):
    for step, damage in zip((1, 2, 3), (truncate, flip_payload_byte, damage_magic)):
        save(tmp_path, 0, step, {"w": torch.randn(100)}, keep=5)
        damage(checkpoint_path(tmp_path, 0, step))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_latest(tmp_path, 0) is None
        assert latest(tmp_path, 0) is None
    messages = " ".join(r.getMessage() for r in caplog.records)
    for step in (1, 2, 3):
        assert checkpoint_path(tmp_path, 0, step).name in messages
    # Listing does not verify: the damaged files are still "available".
    assert list_checkpoints(tmp_path, 0) == [1, 2, 3]


# ----------------------------------------------------------------------------- temp files


def plant_tmp(folder: Path, stage: int, step: int, pid: int, data: bytes) -> Path:
    host = ckpt_store._host_tag()
    p = folder / f".stage{stage}-step{step:08d}.pt.{host}.{pid}.{'ab' * 4}.tmp"
    p.write_bytes(data)
    return p


def test_leftover_tmp_ignored_and_cleaned(tmp_path):
    save(tmp_path, 0, 1, {"x": torch.ones(10)}, keep=3)
    full = checkpoint_path(tmp_path, 0, 1).read_bytes()
    dead_pid = 2**31 - 1  # above any pid_max: never a live process
    dead = plant_tmp(tmp_path, 0, 2, dead_pid, full[: len(full) // 2])
    alive = plant_tmp(tmp_path, 0, 3, os.getppid(), full)  # a live concurrent writer
    old = plant_tmp(tmp_path, 0, 4, os.getppid(), full)
    past = time.time() - 2 * ckpt.STALE_TMP_S
    os.utime(old, (past, past))
    other_stage = plant_tmp(tmp_path, 1, 2, dead_pid, b"x")

    assert list_checkpoints(tmp_path, 0) == [1]
    assert load_latest(tmp_path, 0)[0] == 1

    save(tmp_path, 0, 5, {"x": torch.ones(10)}, keep=3)
    assert not dead.exists() and not old.exists()
    assert alive.exists() and other_stage.exists()


CHILD = textwrap.dedent(
    """
    import sys, torch
    from distqat.checkpoint import list_checkpoints, save
    folder = sys.argv[1]
    step = list_checkpoints(folder, 0)[-1] + 1
    w = torch.randn(5 * 1024 * 1024)  # 20 MB
    print("ready", flush=True)
    while True:
        w[0] = step
        save(folder, 0, step, {"outer_step": step, "w": w}, keep=3)
        step += 1
    """
)


def test_sigkill_mid_write_never_leaves_a_loadable_partial(tmp_path):
    save(tmp_path, 0, 1, {"outer_step": 1, "w": torch.ones(4)}, keep=3)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    rng = random.Random(0)
    leftovers = []
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready and proc.stdout.readline().strip() == b"ready", proc.stderr.read()
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()
        leftovers += tmp_files(tmp_path)

        # Every complete-named file verifies; the loader never returns a temp file.
        steps = list_checkpoints(tmp_path, 0)
        assert steps, "the first checkpoint is never pruned by a crash"
        for step in steps:
            state = load_verified(checkpoint_path(tmp_path, 0, step))
            assert state["outer_step"] == step
        step, path = latest(tmp_path, 0)
        assert path == checkpoint_path(tmp_path, 0, step) and not path.name.endswith(".tmp")
        step, state = load_latest(tmp_path, 0)
        assert step == steps[-1] and state["outer_step"] == step
        if step > 1:
            assert state["w"][0].item() == step and state["w"].numel() == 5 * 1024 * 1024

    # The next save (by another, live process) removes what the dead writers left.
    save(tmp_path, 0, 10**6, {"outer_step": 10**6}, keep=3)
    assert tmp_files(tmp_path) == []
    print(f"temp files left by kills: {leftovers}")


# ----------------------------------------------------------------------------- writer


def test_writer_copies_on_submit_and_writes_all_folders(tmp_path):
    local, shared = tmp_path / "local", tmp_path / "shared"
    state = diloco_state(3)
    expected = diloco_state(3)
    with CheckpointWriter([local, shared], stage=2, keep=2) as writer:
        writer.submit(3, state)
        # Training goes on mutating its tensors in place right after submit.
        for t in state["global_params"]:
            t.add_(100.0)
        for s in state["outer_optim"]["state"].values():
            s["momentum_buffer"].zero_()
        state["data_position"]["offset"] = -1
        writer.flush(timeout=30)
        assert writer.last_written == 3
        for step in (4, 5):
            writer.submit(step, diloco_state(step))
            writer.flush(timeout=30)
    for folder in (local, shared):
        assert list_checkpoints(folder, 2) == [4, 5]
        assert tmp_files(folder) == []
    assert_same(load_verified(checkpoint_path(local, 2, 4)), diloco_state(4))
    assert_same(load_verified(checkpoint_path(shared, 2, 5)), diloco_state(5))
    # Step 3 was pruned; check the copy semantics on a fresh writer.
    with CheckpointWriter([local], stage=3, keep=2) as writer:
        state = diloco_state(3)
        writer.submit(3, state)
        state["global_params"][0].add_(1.0)
    assert_same(load_latest(local, 3), (3, expected))


@pytest.fixture
def blocked_writes(monkeypatch):
    """Background writes wait on the returned Event: proves submit does not wait for them."""
    gate = threading.Event()
    real = ckpt_store._save_encoded

    def gated(*args, **kwargs):
        assert gate.wait(timeout=30), "test never released the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_store, "_save_encoded", gated)
    yield gate
    gate.set()


def test_writer_submit_does_not_wait_and_newest_replaces_pending(tmp_path, caplog, blocked_writes):
    writer = CheckpointWriter([tmp_path], stage=0, keep=5)
    try:
        writer.submit(1, {"w": torch.zeros(3)})  # taken by the thread, blocked in the write
        deadline = time.monotonic() + 10
        while writer._busy != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            writer.submit(2, {"w": torch.full((3,), 2.0)})  # pending
            writer.submit(3, {"w": torch.full((3,), 3.0)})  # replaces 2
        assert list_checkpoints(tmp_path, 0) == []  # submit returned, nothing written yet
        assert any("step 2 replaced by step 3" in r.getMessage() for r in caplog.records)
        with pytest.raises(TimeoutError, match="stage 0 step 1"):
            writer.flush(timeout=0.2)
        blocked_writes.set()
        writer.flush(timeout=30)
        assert list_checkpoints(tmp_path, 0) == [1, 3]
        assert_same(load_latest(tmp_path, 0), (3, {"w": torch.full((3,), 3.0)}))
    finally:
        blocked_writes.set()
        writer.close(timeout=30)


def test_writer_error_surfaces_on_flush_and_other_folders_still_written(tmp_path, caplog):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    good = tmp_path / "good"
    writer = CheckpointWriter([good, not_a_dir / "ckpt"], stage=1, keep=2)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        writer.submit(1, {"w": torch.ones(2)})
        with pytest.raises(CheckpointError, match="stage 1 step 1") as info:
            writer.flush(timeout=30)
    assert str(not_a_dir / "ckpt") in str(info.value)
    assert any("cannot write" in r.getMessage() for r in caplog.records)
    assert list_checkpoints(good, 1) == [1]
    assert writer.last_written is None
    writer.flush(timeout=30)  # raised once, then cleared
    writer.submit(2, {"w": torch.ones(2)})
    with pytest.raises(CheckpointError, match="step 2"):
        writer.close(timeout=30)
    writer.close(timeout=30)  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(3, {"w": torch.ones(2)})


def test_writer_rejects_state_that_weights_only_cannot_load(tmp_path):
    class Opaque:
        pass

    with CheckpointWriter([tmp_path], stage=0, keep=1) as writer:
        with pytest.raises(TypeError, match=r"state\['data_position'\]\['sampler'\]"):
            writer.submit(1, {"data_position": {"sampler": Opaque()}})
    assert list_checkpoints(tmp_path, 0) == []


def test_writer_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="folders"):
        CheckpointWriter([], stage=0, keep=1)
    with pytest.raises(ValueError, match="keep"):
        CheckpointWriter([tmp_path], stage=0, keep=0)
    with pytest.raises(ValueError, match="stage"):
        CheckpointWriter([tmp_path], stage=-1, keep=1)


class _RunsCodeWhenUnpickled:
    """A pickled object whose loading would run a command (what a hostile file carries)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_a_pickled_object_is_refused_not_run(tmp_path):
    # the header and checksum are right: only weights_only=True stands between the file
    # and the code it carries
    marker = tmp_path / "ran"
    path = tmp_path / "stage0-step00000001.pt"
    path.write_bytes(ckpt.encode({"global_params": [torch.ones(2)],
                                  "payload": _RunsCodeWhenUnpickled(marker)}))
    ckpt.verify(path)  # a well-formed file
    with pytest.raises(CheckpointError, match="stage0-step00000001.pt"):
        load_verified(path)
    assert not marker.exists()
