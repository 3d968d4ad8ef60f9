"""Process-level plumbing: the torchrun environment, the store, the default process group,
per-stage groups and the RPC agent.

Everything here is rebuilt on every elastic round (torchrun restarts the workers). RPC
finds its peers through the round's store (under its own key prefix) rather than through a
``tcp://`` address of its own: torch would open a second store server there, one more
listener on every address, on a port picked free and so open to a race. With
``comm.interface`` set, every listener here is bound to that interface (see
:mod:`.interface`).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, urlparse

import torch.distributed as dist
import torch.distributed.rpc as rpc
from torch.distributed.rendezvous import register_rendezvous_handler

from . import round_port
from .interface import configured_interface, serve_on, serve_store, store_address
from .round_port import (ENV_LAUNCHER_STORE, ENV_MASTER_ADDR, ENV_MASTER_PORT, ENV_RANK,
                         ENV_USE_AGENT_STORE)

log = logging.getLogger(__name__)

ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_LOCAL_RANK = "LOCAL_RANK"
ENV_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
RPC_SCHEME = "distqat-store"  # init_rpc's rendezvous through the round's store


@dataclass(frozen=True)
class DistEnv:
    """What torchrun tells a worker about itself."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    restart_count: int
    launcher_store: Optional[str] = None

    @classmethod
    def from_environ(cls, environ: Optional[Dict[str, str]] = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        missing = [k for k in (ENV_RANK, ENV_WORLD_SIZE, ENV_MASTER_ADDR, ENV_MASTER_PORT)
                   if k not in env]
        if missing:
            raise RuntimeError(
                f"missing environment variables {missing}: start distqat.train with torchrun "
                f"(or python -m distqat.local on one machine)")
        return cls(rank=int(env[ENV_RANK]), world_size=int(env[ENV_WORLD_SIZE]),
                   local_rank=int(env.get(ENV_LOCAL_RANK, "0")),
                   master_addr=env[ENV_MASTER_ADDR], master_port=int(env[ENV_MASTER_PORT]),
                   restart_count=int(env.get(ENV_RESTART_COUNT, "0")),
                   launcher_store=env.get(ENV_LAUNCHER_STORE) or None)


def worker_name(rank: int) -> str:
    return f"worker{rank}"


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LOWEST_PICKED_PORT = 10000
MIN_PORTS_OUTSIDE = 1000  # fewer outside the ephemeral range: pick even ones inside it
_SYSTEM_RANDOM = random.SystemRandom()  # unaffected by any seed a test or a run sets
_handed_out: set = set()  # this process's earlier picks, not yet bound by their servers


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` that no listener on port 0 will take meanwhile.

    A port the kernel hands out (``bind(0)``) may be handed out again, to another
    process's listener, between our check and the server's bind; a client of ours would
    then talk to that listener. Ports below the kernel's ephemeral range are never handed
    out by it, so only another caller of this function could race us for one, a chance of
    one in thousands per pair. Where that range leaves too little room, its even ports:
    Linux's ``bind(0)`` takes odd ports (``connect()`` takes even ones, as source ports
    only: a server's bind then fails aloud)."""
    candidates = _candidate_ports()
    for port in _SYSTEM_RANDOM.sample(candidates, k=min(64, len(candidates))):
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on {host} among 64 tries")


def _candidate_ports() -> range:
    try:
        with open(EPHEMERAL_RANGE_FILE) as f:
            low, high = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    below = range(LOWEST_PICKED_PORT, max(LOWEST_PICKED_PORT, low))
    above = range(min(high + 1, 65536), 65536)
    outside = below if len(below) >= len(above) else above
    if len(outside) >= MIN_PORTS_OUTSIDE:
        return outside
    first = max(low, LOWEST_PICKED_PORT)
    return range(first + first % 2, high + 1, 2)


def connect_store(env: DistEnv, timeout: float) -> dist.TCPStore:
    """The round's key-value store: the launcher's when it holds one (distqat.local), else
    at MASTER_ADDR:MASTER_PORT, hosted by rank 0 (on the socket :mod:`.round_port` has
    held since it read its config) unless the agent shares its own store with the
    workers. With ``comm.interface`` set, rank 0 binds it to the address MASTER_ADDR
    resolves to on that interface: torch's own store server listens on every address
    (``::``) whatever host it is given."""
    if env.launcher_store:
        return _launcher_store(env, timeout)
    use_agent_store = os.environ.get(ENV_USE_AGENT_STORE, "False") == "True"
    is_master = env.rank == 0 and not use_agent_store
    interface = configured_interface()
    held = round_port.take() if is_master else None
    if held is not None:  # on the interface's address when one is set
        log.info("round store on %s:%d", *held.getsockname()[:2])
        return serve_on(held, env.master_addr, timeout=timeout, world_size=env.world_size)
    if is_master and interface:
        return _store_on_interface(env, interface, timeout)
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                         is_master=is_master, timeout=timedelta(seconds=timeout),
                         wait_for_workers=False, use_libuv=True)


def _launcher_store(env: DistEnv, timeout: float) -> dist.TCPStore:
    """The store that ``python -m distqat.local`` holds for its one round: every rank is its
    client. It closes the gap between torch's agent letting MASTER_PORT go and rank 0
    binding it (:mod:`.round_port` narrows it where torchrun starts the workers)."""
    host, _, port = env.launcher_store.rpartition(":")
    return dist.TCPStore(host, int(port), env.world_size, is_master=False,
                         timeout=timedelta(seconds=timeout), use_libuv=True)


def _store_on_interface(env: DistEnv, interface: str, timeout: float) -> dist.TCPStore:
    addr = store_address(env.master_addr, interface)
    store = serve_store(addr, env.master_port, timeout=timeout, world_size=env.world_size,
                        client_host=env.master_addr)
    log.info("round store listening on %s:%d only (comm.interface=%s)", addr,
             env.master_port, interface)
    return store


def init_default_group(env: DistEnv, store: dist.Store, timeout: float) -> None:
    """The world's group, always gloo: it carries the object collectives (members,
    restore) and barriers, which are CPU traffic whatever the devices, and a gloo group
    works on a fleet of CPU and GPU hosts alike. The stage groups carry the tensors."""
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=timeout))


def new_stage_groups(stage_ranks: Sequence[Sequence[int]], backends: Sequence[str],
                     timeout: float) -> List[Optional[dist.ProcessGroup]]:
    """One group per stage, made in stage order on every rank (new_group is collective
    over the whole world, so every rank must make every group in the same order), with
    ``backends[stage]`` (:func:`stage_backend`). Returns the group objects; entries are
    None on ranks outside that group."""
    groups = []
    for ranks, backend in zip(stage_ranks, backends):
        group = dist.new_group(ranks=list(ranks), backend=backend,
                               timeout=timedelta(seconds=timeout))
        groups.append(group if dist.get_rank() in ranks else None)
    return groups


# the CPU channels but mpt_uv: tensors between hosts on the pipe's own connection, CMA
# between workers of one host (RPC carries CPU tensors only: no device maps are set, and
# naming a channel this build lacks, e.g. cuda_ipc on a CPU build, fails init_rpc)
SINGLE_CHANNELS = ("cma", "basic")


def init_rpc(env: DistEnv, store: dist.Store, *, num_threads: int, rpc_timeout: float,
             init_timeout: float, transport: str = "uv",
             channels: str = "single") -> None:
    """Start the TensorPipe agent; the peers exchange their addresses through ``store``
    (the round's, under RPC's own ``rpc_prefix_*`` keys), so RPC opens no store server of
    its own. ``transport``: ``comm.rpc_transport`` (``uv``: TCP only, no busy-polling
    shared-memory reactor; ``auto``: TensorPipe's own choice). ``channels``:
    ``comm.rpc_channels`` (``single``: no ``mpt_uv``, see :data:`SINGLE_CHANNELS`).
    TensorPipe listens on the address of ``TP_SOCKET_IFNAME`` when set
    (``comm.interface``), else on the one the host's name resolves to. ``init_timeout``
    is unused (kept for callers): torch bounds the address exchange by ``rpc_timeout``."""
    choices = {"_transports": [transport]} if transport != "auto" else {}
    if channels == "single":
        choices["_channels"] = list(SINGLE_CHANNELS)
    token = f"{os.getpid()}-{next(_rpc_tokens)}"
    _rpc_stores[token] = store
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=num_threads, rpc_timeout=rpc_timeout,
        init_method=f"{RPC_SCHEME}://{token}", **choices)
    round_timeout = store.timeout
    try:
        rpc.init_rpc(worker_name(env.rank), rank=env.rank, world_size=env.world_size,
                     rpc_backend_options=options)
    finally:
        _rpc_stores.pop(token, None)
        store.set_timeout(round_timeout)  # init_rpc set the store's timeout to rpc_timeout


def _rpc_rendezvous(url: str, **kwargs) -> Iterator[Tuple[dist.Store, int, int]]:
    """torch's rendezvous handler for ``distqat-store://TOKEN?rank=R&world_size=N``:
    yields the store :func:`init_rpc` registered under TOKEN."""
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    store = _rpc_stores.pop(parsed.netloc)
    yield store, int(query["rank"][0]), int(query["world_size"][0])


# the store init_rpc hands to torch's rendezvous, by token, for the length of the call:
# a rendezvous handler is found by URL scheme and cannot be given an object
_rpc_stores: Dict[str, dist.Store] = {}
_rpc_tokens = itertools.count()
try:
    register_rendezvous_handler(RPC_SCHEME, _rpc_rendezvous)
except RuntimeError:  # this module imported twice (importlib.reload)
    pass


def shutdown_rpc(graceful: bool, timeout: float) -> None:
    """Graceful shutdown waits for every peer (bounded by ``timeout``); a dead peer makes
    it fail, and then the local agent is stopped without waiting (RECIPES.md)."""
    if graceful:
        try:
            rpc.shutdown(graceful=True, timeout=timeout)
            return
        except Exception as e:  # a peer is gone or late: stop locally
            log.warning("graceful RPC shutdown failed (%s); shutting down locally", e)
    try:
        rpc.shutdown(graceful=False)
    except Exception as e:
        log.debug("local RPC shutdown: %s", e)


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def stage_backend(devices: Sequence[str]) -> str:
    """A stage group's backend from its members' devices (as the plan's members report
    them): NCCL where every member is on CUDA, gloo otherwise (a CPU member cannot join
    NCCL; the GPU members then average CPU copies, see :class:`distqat.diloco.DiLoCo`)."""
    return "nccl" if devices and all(d.startswith("cuda") for d in devices) else "gloo"
