"""comm.interface: every socket a worker listens on is on the configured interface.

Read from the processes' own sockets (psutil, run inside each host's network namespace:
psutil reads the namespace of the process that calls it). The end-to-end test runs two
"hosts" in network namespaces with their own addresses and host names (RECIPES.md), each
through launch/host.sh; names resolve through /etc/netns/<ns>/hosts, which `ip netns
exec` mounts over /etc/hosts for that namespace only (the machine's /etc/hosts is never
touched). The hosts share two links, as a host often sits on two networks: the one named
in comm.interface, and another that host B's name resolves to, where torch's defaults
(gloo, TensorPipe) would listen. Host A's name must resolve to its interface's address:
it is MASTER_ADDR (the rendezvous gives rank 0 to the smallest host name).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, TAG_VAR, kill_tagged
from distqat.config import ConfigError
from distqat.elastic.interface import (IFNAME_VARS, check_interface, export_interface,
                                       serve_store, store_address)

LOOPBACK = ("127.0.0.1", "::1")
RDZV_PORT = 29400  # free: each namespace has its own ports
OUTER_STEPS = 3
# the listening sockets of the process tree under argv[1] (workers have RANK set), one
# JSON row per new one, until that process ends or argv[2] seconds pass
SAMPLER = r"""
import json, sys, time, psutil
root, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
seen = set()
while time.monotonic() < deadline:
    try:
        top = psutil.Process(root)
        procs = [top] + top.children(recursive=True)
    except psutil.NoSuchProcess:
        break
    for p in procs:
        try:
            env = p.environ()
            for c in p.net_connections(kind="inet"):
                row = (p.pid, env.get("RANK"), env.get("MASTER_PORT"),
                       env.get("DISTQAT_LAUNCHER_STORE"), c.laddr.ip, c.laddr.port)
                if c.status == psutil.CONN_LISTEN and row not in seen:
                    seen.add(row)
                    print(json.dumps(row), flush=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    time.sleep(0.2)
"""


@dataclass(frozen=True)
class Listener:
    pid: int
    rank: str | None  # None: not a worker (the agent, the launcher)
    master_port: str | None
    launcher_store: str | None  # "host:port", in the workers distqat.local starts
    ip: str
    port: int


def _listeners(text: str) -> list[Listener]:
    return [Listener(*json.loads(line)) for line in text.splitlines() if line.startswith("[")]


def _sampler(root_pid: int, seconds: float, tag: str,
             netns: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SAMPLER, str(root_pid), str(seconds)]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(tag))


def _env(tag: str) -> dict:
    return dict(os.environ, **{TAG_VAR: tag, "DISTQAT_NO_PROGRESS": "1",
                               "PYTHONPATH": str(ROOT) + os.pathsep
                               + os.environ.get("PYTHONPATH", "")})


def _other_address() -> str | None:
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


# ---------------------------------------------------------------- checks without processes

def test_unknown_interface_names_the_field():
    check_interface("")  # torch's defaults
    check_interface("lo")
    with pytest.raises(ConfigError, match=r"^comm\.interface: expected a network interface "
                                          r"of this host \(.*lo.*\), got 'nope0'"):
        check_interface("nope0")


def test_export_sets_every_library_variable():
    env = {"GLOO_SOCKET_IFNAME": "eth9"}
    export_interface("", env)
    assert env == {"GLOO_SOCKET_IFNAME": "eth9"}  # empty: torch's defaults, untouched
    export_interface("lo", env)
    assert all(env[var] == "lo" for var in IFNAME_VARS)


def test_store_address_must_be_on_the_interface_or_loopback():
    assert store_address("127.0.0.1", "lo") == "127.0.0.1"
    other = _other_address()
    if other is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    with pytest.raises(RuntimeError, match=rf"comm\.interface: MASTER_ADDR '{other}' "
                                           rf"resolves to {other}, which is not an address "
                                           rf"of interface 'lo'"):
        store_address(other, "lo")


def test_serve_store_listens_on_its_address_only():
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = serve_store("127.0.0.1", 0, timeout=10)
    client = TCPStore("127.0.0.1", store.port, is_master=False, use_libuv=True,
                      timeout=timedelta(seconds=10))
    client.set("k", "v")
    assert store.get("k") == b"v"
    mine = [c.laddr for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == store.port]
    assert [(a.ip, a.port) for a in mine] == [("127.0.0.1", store.port)]


def test_with_a_launcher_store_every_rank_is_its_client_and_master_port_is_never_dialled():
    """distqat.local holds the round's store; rank 0 does not serve one on MASTER_PORT,
    which torch's agent picked and let go (another process's listener may hold it now)."""
    from distqat.elastic.dist import DistEnv, connect_store

    held = serve_store("127.0.0.1", 0, timeout=10)
    with socket.socket() as trap:  # what could sit on MASTER_PORT meanwhile
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.settimeout(0.5)
        envs = [DistEnv(rank=r, world_size=2, local_rank=r, master_addr="127.0.0.1",
                        master_port=trap.getsockname()[1], restart_count=0,
                        launcher_store=f"127.0.0.1:{held.port}") for r in range(2)]
        rank0, rank1 = (connect_store(env, timeout=10) for env in envs)
        rank0.set("k", "v")
        assert rank1.get("k") == b"v" and held.get("k") == b"v"
        with pytest.raises(socket.timeout):
            trap.accept()


@pytest.mark.parametrize("interface, where", [(None, ("::", "0.0.0.0")), ("lo", ("127.0.0.1",))])
def test_rank_0_serves_the_round_store_on_the_port_it_held_from_the_start(interface, where):
    """Under torchrun, rank 0 listens on MASTER_PORT as soon as it has read its config
    (round_port.hold; on the interface's address when one is set) and the store serves on
    that very socket; other ranks, and rank 0 of a launcher's store, hold nothing."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from distqat.elastic import round_port
    from distqat.elastic.dist import DistEnv, connect_store, free_port

    port = str(free_port())
    rank0 = {"RANK": "0", "MASTER_PORT": port, "MASTER_ADDR": "127.0.0.1"}
    for environ in ({**rank0, "RANK": "1"}, {**rank0, "DISTQAT_LAUNCHER_STORE": "h:1"},
                    {**rank0, "TORCHELASTIC_USE_AGENT_STORE": "True"}):
        round_port.hold(interface, environ)
        assert round_port.take() is None, environ
    round_port.hold(interface, rank0)
    mine = [c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)]
    assert len(mine) == 1 and mine[0] in where, mine  # before any store exists
    env = DistEnv(rank=0, world_size=2, local_rank=0, master_addr="127.0.0.1",
                  master_port=int(port), restart_count=0)
    store = connect_store(env, timeout=10)
    assert round_port.take() is None  # the store owns it now
    rank1 = TCPStore("127.0.0.1", int(port), 2, is_master=False, use_libuv=True,
                     timeout=timedelta(seconds=10))
    rank1.set("k", "v")
    assert store.get("k") == b"v"


# ---------------------------------------------------------------- launch/store.py

@pytest.mark.timeout(60)
@pytest.mark.parametrize("where,expected", [(["--interface", "lo"], ["127.0.0.1"]),
                                            (["--host", "127.0.0.1"], ["127.0.0.1"]),
                                            ([], ["::", "0.0.0.0"])])
def test_standalone_store_binds_where_asked(where, expected):
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "store.py"), "--port", "0",
                             *where], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(uuid.uuid4().hex))
    try:
        line = proc.stdout.readline()
        assert line.startswith("c10d store listening on"), line
        port = int(re.search(r"(\d+)( only)?$", line.strip()).group(1))
        found = {(c.laddr.ip, c.laddr.port) for c in
                 psutil.Process(proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
        assert len(found) == 1 and next(iter(found))[1] == port, (line, found)
        assert next(iter(found))[0] in expected, found
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.timeout(60)
def test_standalone_store_refuses_an_unknown_interface():
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "store.py"), "--port", "0",
                           "--interface", "nope0"], capture_output=True, text=True,
                          timeout=50, env=_env(uuid.uuid4().hex))
    assert done.returncode == 2
    assert done.stderr.startswith("launch/store.py: --interface: expected a network "
                                  "interface of this host"), done.stderr


@pytest.mark.timeout(60)
def test_unknown_interface_exits_2_before_any_worker(tmp_path, launcher):
    """The message lists this host's interfaces. Other tests of this file add and remove
    veth pairs (``dq<pid>...``) while it runs, so the list is checked against the
    interfaces seen before and after the run, not one snapshot."""
    before = set(psutil.net_if_addrs())
    code, out = launcher.run("comm.interface=nope0", timeout=50)
    after = set(psutil.net_if_addrs())
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    found = re.fullmatch(r"distqat: config error: comm\.interface: expected a network "
                         r"interface of this host \((.+)\), got 'nope0'", lines[0])
    assert found, out
    listed = found.group(1).split(", ")
    assert listed == sorted(listed), out
    assert before & after <= set(listed), out
    assert all(name in before | after or name.startswith("dq") for name in listed), out
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- one host, loopback

@pytest.mark.timeout(120)
def test_local_job_on_loopback_listens_on_loopback_only(tmp_path, launcher):
    """Runs where namespaces cannot be made: with comm.interface=lo the workers' sockets,
    the round's store included (torch would put it on ``::``), are all on 127.0.0.1, and
    so is the rendezvous store that distqat.local itself hosts."""
    proc = launcher.start("comm.interface=lo", f"diloco.outer_steps={OUTER_STEPS}",
                          "diloco.inner_steps=5", "eval_every=0")
    sampler = _sampler(proc.pid, 100, launcher.tag)
    out, _ = proc.communicate(timeout=100)
    rows = _listeners(sampler.communicate(timeout=20)[0])
    assert proc.returncode == 0, out[-3000:]
    assert launcher.summary()["outer_steps_done"] == OUTER_STEPS
    workers = [r for r in rows if r.rank is not None]
    assert {r.rank for r in workers} == {"0", "1", "2", "3"}, rows
    assert all(r.ip == "127.0.0.1" for r in workers), [r for r in workers
                                                         if r.ip != "127.0.0.1"]
    # the round's store is the one distqat.local holds, not one on torch's MASTER_PORT
    assert not any(str(r.port) == r.master_port for r in workers), workers
    stores = {r.launcher_store for r in workers}
    assert len(stores) == 1 and None not in stores, stores
    launcher_rows = [r for r in rows if r.pid == proc.pid]
    assert launcher_rows and all(r.ip == "127.0.0.1" for r in launcher_rows), launcher_rows
    assert stores.pop() in {f"{r.ip}:{r.port}" for r in launcher_rows}, launcher_rows


# ---------------------------------------------------------------- two hosts, namespaces

@dataclass(frozen=True)
class Host:
    ns: str  # also the name of its veth end on the job's link: comm.interface
    addr: str  # on the job's link
    other: str  # its address on the other link
    name: str
    cwd: Path


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"making network namespaces needs `{tool}`, not found")
    pid = os.getpid()
    # any private ranges will do: nothing outside these two namespaces sees their addresses
    net, other = (f"10.{200 + pid % 50}.{(pid // 50 + k) % 250}" for k in (0, 1))
    hosts = [Host(f"dq{pid}{x}", f"{net}.{i}", f"{other}.{i}", f"dqhost{pid}{x}", tmp_path / x)
             for i, x in ((1, "a"), (2, "b"))]
    tag = uuid.uuid4().hex
    try:
        for h in hosts:
            _ip("netns", "del", h.ns)  # a leftover of a killed run with this pid
            made = _ip("netns", "add", h.ns)
            if made.returncode != 0:
                pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
        a, b = hosts
        steps = [("link", "add", a.ns, "type", "veth", "peer", "name", b.ns),
                 ("link", "add", a.ns + "o", "type", "veth", "peer", "name", b.ns + "o")]
        for h in hosts:
            for dev, addr in ((h.ns, h.addr), (h.ns + "o", h.other)):
                steps += [("link", "set", dev, "netns", h.ns),
                          ("-n", h.ns, "addr", "add", f"{addr}/24", "dev", dev),
                          ("-n", h.ns, "link", "set", dev, "up")]
            steps.append(("-n", h.ns, "link", "set", "lo", "up"))
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        names = f"{a.addr} {a.name}\n{b.other} {b.name}\n"
        for h in hosts:
            Path(f"/etc/netns/{h.ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{h.ns}/hosts").write_text(f"127.0.0.1 localhost\n{names}")
            h.cwd.mkdir()
        yield hosts, tag
    finally:
        kill_tagged(tag)  # before the namespaces go: nothing of ours is left inside
        for h in hosts:
            _ip("netns", "del", h.ns)  # its veth ends (and so the pairs) go with it
            shutil.rmtree(f"/etc/netns/{h.ns}", ignore_errors=True)


def _start_host(h: Host, head: Host, tag: str) -> subprocess.Popen:
    script = 'hostname "$0" && exec "$@"'  # its own host name, then host.sh
    cmd = ["ip", "netns", "exec", h.ns, "unshare", "--uts", "sh", "-c", script, h.name,
           str(ROOT / "launch" / "host.sh"), "--rdzv-endpoint", f"{head.addr}:{RDZV_PORT}",
           "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-id", tag, "--max-restarts", "0",
           "--config", str(ROOT / "configs" / "tiny.yaml"), f"diloco.outer_steps={OUTER_STEPS}",
           "diloco.inner_steps=5", "eval_every=0", f"comm.interface={h.ns}"]
    return subprocess.Popen(cmd, cwd=h.cwd, env=_env(tag), stdout=open(h.cwd / "out", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.timeout(150)
def test_two_hosts_listen_on_their_interface_only(two_hosts):
    hosts, tag = two_hosts
    head = hosts[0]
    agents = [_start_host(h, head, tag) for h in hosts]
    samplers = [_sampler(p.pid, 110, tag, netns=h.ns) for p, h in zip(agents, hosts)]
    deadline = time.monotonic() + 110
    for p, h in zip(agents, hosts):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{h.name} ran past 110 s:\n{(h.cwd / 'out').read_text()[-3000:]}")
    rows = {h.ns: _listeners(s.communicate(timeout=20)[0]) for h, s in zip(hosts, samplers)}
    for p, h in zip(agents, hosts):
        assert p.returncode == 0, (h.cwd / "out").read_text()[-3000:]

    # the job trained to the end (summary.json is on rank 0's host)
    rank0 = [h for h in hosts if any(r.rank == "0" for r in rows[h.ns])]
    assert len(rank0) == 1, rows
    summary = json.loads((rank0[0].cwd / "runs" / "tiny" / "summary.json").read_text())
    assert summary["exit_reason"] == "completed"
    assert summary["outer_steps_done"] == OUTER_STEPS

    for h in hosts:
        workers = [r for r in rows[h.ns] if r.rank is not None]
        others = [r for r in rows[h.ns] if r.rank is None]
        # every socket a worker listens on: gloo, TensorPipe, the round's store
        assert workers and all(r.ip in (h.addr,) + LOOPBACK for r in workers), (
            h.name, [r for r in workers if r.ip not in (h.addr,) + LOOPBACK])
        assert len({r.rank for r in workers}) == 2, (h.name, workers)  # 2 per host, seen
        # what we cannot bind: torchrun's own rendezvous store, in the agent owning the
        # endpoint, listens on every address (its free-port probe for MASTER_PORT binds
        # loopback, briefly)
        assert all(r.port == RDZV_PORT or r.ip in LOOPBACK for r in others), (h.name, others)
    store = [r for r in rows[rank0[0].ns] if r.rank == "0" and str(r.port) == r.master_port]
    assert [r.ip for r in store] == [rank0[0].addr], rows[rank0[0].ns]
