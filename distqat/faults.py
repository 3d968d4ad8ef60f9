"""Test-only fault injection: a host that dies at a chosen moment of the protocol, and a
replica made slower than it is.

A kill from outside at a random moment rarely lands inside a 10 ms all-reduce, a
checkpoint write or a round's restore, yet those are the moments where a bug would lose
state. So the chaos benchmark (``bench/chaos.py``) and its test *arm* a moment instead:
they write ``{"point": NAME, "host_pid": PID}`` to the file named by the environment
variable :data:`ENV` (set only by them). A worker that reaches point ``NAME`` and runs
under process ``PID`` (the simulated host: its launcher script, agent and workers) removes
the file, so the fault fires once, and kills that whole host with SIGKILL, itself last:
the same death as a kill from outside, at a known moment.

Without the variable (every real job) :func:`point` returns at once.

**A slower replica** (:data:`SLOWDOWN_ENV`, e.g. ``DISTQAT_TEST_SLOWDOWN=1:3``): after each
inner step, replica 1's driver sleeps twice that step's time, so its steps take three
times as long, as on a host three times slower, whatever its batch size. It is how the
tests and ``bench/hetero.py`` make unequal hosts on one machine: sleeping costs no core,
so the other replicas keep theirs. Never set it for a real job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Dict

log = logging.getLogger(__name__)

ENV = "DISTQAT_FAULT_FILE"
POINTS = ("allreduce", "checkpoint", "restore")
"""``allreduce``: a stage host entering its outer step's collective (its peers are in
it or about to be); ``checkpoint``: a checkpoint's temp file written and fsynced, not yet
renamed; ``restore``: a round's restore decided, the state not yet loaded and broadcast."""

_FILE = os.environ.get(ENV)
SLOWDOWN_ENV = "DISTQAT_TEST_SLOWDOWN"


def slowdown_factors(text: str) -> Dict[int, float]:
    """``"1:3,2:1.5"`` -> {1: 3.0, 2: 1.5}: replica -> how many times slower (>= 1)."""
    factors = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        replica, _, factor = item.partition(":")
        try:
            factors[int(replica)] = float(factor)
        except ValueError:
            raise ValueError(f"{SLOWDOWN_ENV}: expected replica:factor[,replica:factor], "
                             f"got {text!r}") from None
        if factors[int(replica)] < 1 or int(replica) < 0:
            raise ValueError(f"{SLOWDOWN_ENV}: expected a replica >= 0 and a factor >= 1, "
                             f"got {item!r}")
    return factors


_SLOWDOWN = slowdown_factors(os.environ.get(SLOWDOWN_ENV, ""))


def slow_down(replica: int, elapsed: float) -> None:
    """Sleep so that an inner step of ``replica`` that took ``elapsed`` seconds takes its
    slowdown factor times as long (test-only; nothing without the variable)."""
    factor = _SLOWDOWN.get(replica)
    if factor is not None and factor > 1:
        time.sleep((factor - 1) * elapsed)


def point(name: str) -> None:
    """Die here, with the whole simulated host, if the armed fault names this point."""
    if _FILE is None:
        return
    try:
        with open(_FILE) as f:
            armed = json.load(f)
    except (OSError, ValueError):
        return  # not armed (or being written: the next point will see it)
    if armed.get("point") != name or not _under(int(armed.get("host_pid", -1))):
        return
    try:
        os.unlink(_FILE)  # one shot: the first worker of the host to get here fires
    except FileNotFoundError:
        return
    log.warning("fault injection: host %s dies at point %s", armed["host_pid"], name)
    _kill_host(int(armed["host_pid"]))


def _under(host_pid: int) -> bool:
    import psutil

    try:
        return any(p.pid == host_pid for p in psutil.Process().parents())
    except psutil.Error:
        return False


def _kill_host(host_pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(host_pid)
        victims = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        victims = []
    me = os.getpid()
    for proc in victims:
        if proc.pid != me:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    os.kill(me, signal.SIGKILL)
