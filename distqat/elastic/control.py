"""Steering a running job from outside: stop it (finish the current outer step, save, exit 0
on every host) or save now (a snapshot of the next outer step, training goes on).

A request is a file in the run folder, ``control/stop.json`` or ``control/save.json``,
written by ``python -m distqat.status RUN_DIR --stop|--save`` (:func:`request`) on any
host that sees the run folder. Every worker watches its own host's run folder (a thread,
every :data:`POLL_S`) and relays a request it finds to the round's store, so one file
reaches the whole job whichever host it was written on; the same thread copies the
store's requests into local flags, so the training loop never waits on the network for
them.

Why a stop needs agreement: replicas meet at every outer step (each stage group's
all-reduce), so a replica that stopped after outer step k while another went on to k+1
would leave the other waiting forever. The first driver to see a stop proposes
``stop_at = its outer steps done + 1`` (compare-and-set on the store: the first proposal
wins). No replica can have finished outer step ``stop_at`` by then, since that needs the
proposer's all-reduce and the proposer is still in its inner steps. Every driver reads
``stop_at`` after each outer step and stops once it has done that many: all stop after the
same outer step.

A request is consumed once the job has acted on it: a stop when the job ended (each worker
removes its host's file on its way out), a save once replica 0's driver wrote it (the store
says which request was saved; each host's watcher removes its own file). A request is only
for the job that was running when it was made: a worker ignores requests older than its
agent (torchrun, the parent process, which lives across the job's rounds), so a stop left
behind by a job that died before acting on it does not stop the next job in the folder.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import psutil

from ..fileio import read_json, write_json

log = logging.getLogger(__name__)

CONTROL_DIR = "control"
STOP, SAVE = "stop", "save"
KINDS = (STOP, SAVE)
POLL_S = 1.0
_KEY = "distqat/control/"
STOP_AT_KEY = _KEY + "stop_at"
SAVED_KEY = _KEY + "saved"  # the id of the save request replica 0's driver has written


def request_path(run_path: Path, kind: str) -> Path:
    return run_path / CONTROL_DIR / f"{kind}.json"


def request(run_path: Path, kind: str) -> Dict[str, object]:
    """Leave a ``kind`` request for the job running in ``run_path``; returns it."""
    if kind not in KINDS:
        raise ValueError(f"unknown request {kind!r}; expected one of {KINDS}")
    req = {"id": secrets.token_hex(6), "kind": kind, "time": time.time(),
           "host": socket.gethostname()}
    write_json(request_path(run_path, kind), req)
    return req


def pending(run_path: Path, since: float = 0.0) -> Dict[str, dict]:
    """The requests in ``run_path`` made after ``since`` that no job has acted on yet."""
    found = {kind: read_json(request_path(run_path, kind)) for kind in KINDS}
    return {kind: req for kind, req in found.items()
            if isinstance(req, dict) and "id" in req and req.get("time", 0) > since}


def agent_started() -> float:
    """When this worker's agent started (the job's start on this host): the parent
    process's start, or this process's own when it has no parent to ask."""
    me = psutil.Process(os.getpid())
    try:
        parent = me.parent()
        return parent.create_time() if parent is not None else me.create_time()
    except psutil.Error:
        return me.create_time()


class JobControl:
    """One worker's end of the control channel for one round (see the module docstring):
    :meth:`start` the watcher once the round's store exists, :meth:`close` before leaving."""

    def __init__(self, run_path: Path, store, since: float = 0.0, poll_s: float = POLL_S):
        self.run_path = run_path
        self.store = store
        self.since = since  # requests older than this were for an earlier job
        self.poll_s = poll_s
        self._relayed: set = set()
        self._requests: Dict[str, dict] = {}  # kind -> the request the store holds
        self._saved: Optional[str] = None
        self._proposed = False
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="job-control", daemon=True)

    def start(self) -> "JobControl":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_s + 5)

    def _watch(self) -> None:
        while not self._closing.is_set():
            try:
                self.poll()
            except Exception as e:  # the store is gone (the round is ending): stop watching
                log.debug("control watcher stops: %s", e)
                return
            self._closing.wait(self.poll_s)

    def poll(self) -> None:
        """Relay this host's request files to the store, read the store's requests."""
        for kind, req in pending(self.run_path, self.since).items():
            if req["id"] not in self._relayed:
                self.store.set(_KEY + kind, json.dumps(req))
                self._relayed.add(req["id"])
                log.info("%s request %s (from %s) relayed to the job", kind, req["id"],
                         req.get("host"))
        found = {kind: json.loads(self.store.get(_KEY + kind)) for kind in KINDS
                 if self.store.check([_KEY + kind])}
        saved = self.store.get(SAVED_KEY).decode() if self.store.check([SAVED_KEY]) else None
        with self._lock:
            self._requests, self._saved = found, saved
        if saved is not None:
            self._consume(SAVE, saved)

    def _consume(self, kind: str, request_id: str) -> None:
        path = request_path(self.run_path, kind)
        req = read_json(path)
        if isinstance(req, dict) and req.get("id") == request_id:
            path.unlink(missing_ok=True)

    # -- stop ------------------------------------------------------------------------------

    def stop_wanted(self) -> bool:
        with self._lock:
            return STOP in self._requests

    def propose_stop(self, outer_steps_done: int) -> int:
        """Propose stopping after outer step ``outer_steps_done + 1`` (once); returns the
        outer step the job agreed on (the first proposal wins)."""
        agreed = self.store.compare_set(STOP_AT_KEY, "", str(outer_steps_done + 1))
        if not self._proposed:
            self._proposed = True
            log.warning("stop requested: the job stops after outer step %s", agreed.decode())
        return int(agreed)

    def stop_at(self) -> Optional[int]:
        """The outer step after which the job stops (read from the store, not a cached
        flag: after an outer step every driver must see the same answer)."""
        if not self.store.check([STOP_AT_KEY]):
            return None
        return int(self.store.get(STOP_AT_KEY))

    def consume_stop(self) -> None:
        """The job has stopped: remove this host's stop request, if it is the one acted on."""
        with self._lock:
            req = self._requests.get(STOP)
        if req is not None:
            self._consume(STOP, req["id"])

    # -- save ------------------------------------------------------------------------------

    def save_wanted(self) -> Optional[str]:
        """The id of a save request not yet written, or None."""
        with self._lock:
            req = self._requests.get(SAVE)
            return req["id"] if req is not None and req["id"] != self._saved else None

    def mark_saved(self, request_id: str) -> None:
        self.store.set(SAVED_KEY, request_id)
        with self._lock:
            self._saved = request_id
