"""Shared test helpers: bounded subprocesses, each ended by its PID at teardown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from distqat.compat import import_torchvision

# as distqat does before it imports transformers' models (see distqat.compat)
import_torchvision()

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))  # launch/localcluster.py: simulated hosts
TAG_VAR = "DISTQAT_TEST_TAG"


def tagged_processes(tag: str):
    """Live processes started under ``tag`` (found through their environment)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


FATAL = re.compile(r"terminate called|what\(\)|Fatal Python error|exitcode: -|Traceback|Error:")


def failure_text(out: str, tail: int = 4000) -> str:
    """What a failed run printed, for an assertion message: the lines that say why a
    process died (an abort's reason is often far above the tail, in another rank's
    output), then the tail."""
    lines = [line for line in out.splitlines() if FATAL.search(line)][:40]
    return "\n".join(["-- fatal lines --", *lines, "-- tail --", out[-tail:]])


def kill_tagged(tag: str) -> None:
    for proc in tagged_processes(tag):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


class Launcher:
    """Runs ``python -m distqat.local`` (or another module) in ``cwd`` with a tag that every
    descendant inherits, so the test can find and end all of them by PID."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.tag = uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []

    def env(self) -> dict:
        env = dict(os.environ)
        env[TAG_VAR] = self.tag
        env["DISTQAT_NO_PROGRESS"] = "1"
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self, *args: str, module: str = "distqat.local") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=self.cwd,
                                env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 240, module: str = "distqat.local"):
        proc = self.start(*args, module=module)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            out, _ = proc.communicate(timeout=10)
            pytest.fail(f"{module} {' '.join(args)} ran past {timeout} s:\n{out[-4000:]}")
        return proc.returncode, out

    def summary(self, experiment: str = "tiny") -> dict:
        return json.loads((self.cwd / "runs" / experiment / "summary.json").read_text())

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        kill_tagged(self.tag)


@pytest.fixture
def launcher(tmp_path):
    launch = Launcher(tmp_path)
    yield launch
    launch.close()


class RunCache:
    """Finished ``distqat.local`` runs shared by the tests of a session, keyed by their
    arguments (each e2e run costs ~20 s on 2 cores: reading one twice is cheaper)."""

    def __init__(self, base: Path):
        self.base = base
        self.runs: dict = {}
        self.launchers: list = []

    def get(self, *args: str, timeout: float = 240):
        if args not in self.runs:
            cwd = self.base / f"run{len(self.runs)}"
            cwd.mkdir()
            launch = Launcher(cwd)
            self.launchers.append(launch)
            code, out = launch.run(*args, timeout=timeout)
            self.runs[args] = (code, out, launch)
        return self.runs[args]

    def summary(self, *args: str) -> dict:
        """The summary of a run that must have succeeded."""
        code, out, launch = self.get(*args)
        assert code == 0, out[-4000:]
        return launch.summary()

    def close(self):
        for launch in self.launchers:
            launch.close()


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    cache = RunCache(tmp_path_factory.mktemp("runs"))
    yield cache
    cache.close()


# Tests whose processes time each other (rounds, heartbeats, SLURM, signals) run one after
# another on one xdist worker (`pytest -n 2 --dist loadgroup`); the rest share both.
TIMED_FILES = {"test_elastic.py", "test_chaos.py", "test_slurm.py", "test_status.py",
               "test_interface.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in TIMED_FILES:
            item.add_marker(pytest.mark.xdist_group("timed"))
