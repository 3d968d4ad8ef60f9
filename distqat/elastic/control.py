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
would leave the other waiting forever. The first driver to want the round to end proposes
"after outer step d + 1", d being its outer steps done (compare-and-set on the store: the
first proposal wins, with its reason). No replica can have finished outer step d + 1 by
then, since that needs the proposer's all-reduce and the proposer is still in its inner
steps. Every driver reads the agreement after each outer step and ends once it has done
that many: all end after the same outer step. The reasons: a stop request (the job ends,
exit 0), or a member lost (:mod:`.liveness`: the round ends so that the next one forms
without it).

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
from typing import Any, Callable, Dict, Iterable, Optional

import psutil

from ..fileio import read_json, write_json
from .liveness import LEFT, Liveness, lost_members

log = logging.getLogger(__name__)

CONTROL_DIR = "control"
STOP, SAVE = "stop", "save"
KINDS = (STOP, SAVE)
POLL_S = 1.0
_KEY = "distqat/control/"
END_KEY = _KEY + "end"  # {"outer": the outer step the round ends after, "reason": ...}
SAVED_KEY = _KEY + "saved"  # the id of the save request replica 0's driver has written


class RoundEnded(RuntimeError):
    """The drivers agreed to end this round for a reason other than a stop (a member was
    lost): the worker leaves with an error so that torchrun forms the next round."""


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

    def __init__(self, run_path: Path, store, since: float = 0.0, poll_s: float = POLL_S,
                 liveness: Optional[Liveness] = None, needed: Iterable[int] = (),
                 on_broken: Callable[[str], Any] = lambda why: None):
        self.run_path = run_path
        self.store = store
        self.liveness = liveness
        self.needed = frozenset(needed)  # ranks holding a stage: losing one breaks the round
        self.on_broken = on_broken  # leaves the round at once (see distqat.elastic.liveness)
        self._answered = time.monotonic()  # when the round's store last answered us
        self.since = since  # requests older than this were for an earlier job
        self.poll_s = poll_s
        self._relayed: set = set()
        self._requests: Dict[str, dict] = {}  # kind -> the request the store holds
        self._saved: Optional[str] = None
        self._lost: Optional[str] = None
        self._proposed = False
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="job-control", daemon=True)

    def start(self) -> "JobControl":
        self._thread.start()
        if self.liveness is not None:
            threading.Thread(target=self._watch_store, name="job-control-watchdog",
                             daemon=True).start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_s + 5)
        if self.liveness is not None:
            try:
                self.liveness.leave()
            except Exception as e:  # the store is gone: the round is over anyway
                log.debug("could not say we left: %s", e)

    def _watch(self) -> None:
        while not self._closing.is_set():
            try:
                if self.liveness is not None:
                    self.liveness.poll()
                self.poll()
            except Exception as e:  # the store is gone (the round is ending): stop watching
                log.debug("control watcher stops: %s", e)
                return
            self._answered = time.monotonic()
            self._closing.wait(self.poll_s)

    def _watch_store(self) -> None:
        """A store that neither answers nor fails is a hung rank 0: leave the round."""
        limit = self.liveness.lost_after
        while not self._closing.wait(self.poll_s) and self._thread.is_alive():
            silent = time.monotonic() - self._answered
            if silent > limit:
                self.on_broken(f"the round's store (rank 0) has not answered for {silent:.0f} s")
                return

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
        lost = lost_members(self.store)
        with self._lock:
            self._requests, self._saved = found, saved
            self._lost = lost[1] if lost else None
        if saved is not None:
            self._consume(SAVE, saved)
        if lost is not None and self.needed.intersection(lost[0]):
            self.on_broken(f"{lost[1]}, and a stage is lost with it")

    def _consume(self, kind: str, request_id: str) -> None:
        path = request_path(self.run_path, kind)
        req = read_json(path)
        if isinstance(req, dict) and req.get("id") == request_id:
            path.unlink(missing_ok=True)

    # -- the end of the round: a stop, or a member lost ----------------------------------

    def leave_together(self, world_size: int, timeout: float) -> None:
        """Say this worker is done and wait until every rank has said so. A rank that died
        meanwhile (rank 0 reports it silent) would hold every agent at torchrun's exit
        barrier for 300 s; raise :class:`RoundEnded` instead, so that the agents meet again
        without it and the next round, finding the job done, ends at once."""
        if self.liveness is not None:
            self.liveness.leave()
        keys = [LEFT + str(rank) for rank in range(world_size)]
        deadline = time.monotonic() + timeout
        while not self.store.check(keys):
            lost = lost_members(self.store)
            if lost is not None or time.monotonic() > deadline:
                what = lost[1] if lost else f"not every rank was done within {timeout:.0f} s"
                raise RoundEnded(f"a member was lost at the end of the job ({what})")
            time.sleep(0.2)

    def end_wanted(self) -> Optional[str]:
        """Why this round should end after the next outer step (``stop``, or which members
        were lost), or None."""
        with self._lock:
            return STOP if STOP in self._requests else self._lost

    def propose_end(self, outer_steps_done: int, reason: str) -> dict:
        """Propose ending after outer step ``outer_steps_done + 1``; returns what the job
        agreed on (the first proposal wins)."""
        mine = json.dumps({"outer": outer_steps_done + 1, "reason": reason})
        agreed = json.loads(self.store.compare_set(END_KEY, "", mine))
        if not self._proposed:
            self._proposed = True
            log.warning("the round ends after outer step %d (%s)", agreed["outer"],
                        agreed["reason"])
        return agreed

    def end_at(self) -> Optional[dict]:
        """The agreed end, ``{"outer": k, "reason": ...}``, or None (read from the store, not
        a cached flag: after an outer step every driver must see the same answer)."""
        if not self.store.check([END_KEY]):
            return None
        return json.loads(self.store.get(END_KEY))

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
