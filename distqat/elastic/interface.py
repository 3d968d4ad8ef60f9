"""The network interface a worker listens on (``comm.interface``).

Why it matters: torch's RPC unpickles every message it receives, so anyone who can reach a
worker's ports can run code in it. Listening only on a private interface (a cluster
network, a VPN such as WireGuard) keeps the ports off every other network of the host.

What holds when an interface is named (measured with torch 2.13, see tests/test_interface.py):

- gloo, TensorPipe and NCCL pick their own listening address from
  ``GLOO_SOCKET_IFNAME`` / ``TP_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, which
  :func:`export_interface` sets before any process group or RPC agent starts;
- the round's TCPStore (rank 0) would listen on every address (``::``) whatever host it is
  given; :func:`serve_store` binds the socket itself and the store serves on it;
- RPC finds its peers through that same store, so it opens no store of its own.

Names are per host (each host may name its own interface); an unknown name is a config
error, reported before any worker starts.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from datetime import timedelta
from typing import TYPE_CHECKING, List, MutableMapping, Optional

import psutil

from ..config import ConfigError

if TYPE_CHECKING:
    from torch.distributed import TCPStore

log = logging.getLogger(__name__)

ENV_INTERFACE = "DISTQAT_SOCKET_IFNAME"  # what the worker's own listeners read
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
LISTEN_BACKLOG = 2048  # the TCPStore's own backlog: every worker connects at once


def interface_addresses(name: str, field: str = "comm.interface") -> List[str]:
    """The IPv4 addresses of interface ``name``; ConfigError naming ``field`` if this host
    has no such interface or it has no IPv4 address (gloo and TensorPipe take the
    interface's first address, and peers must reach it)."""
    interfaces = psutil.net_if_addrs()
    if name not in interfaces:
        raise ConfigError(f"{field}: expected a network interface of this host "
                          f"({', '.join(sorted(interfaces))}), got {name!r}")
    addrs = [a.address for a in interfaces[name] if a.family == socket.AF_INET]
    if not addrs:
        raise ConfigError(f"{field}: interface {name!r} has no IPv4 address; expected one "
                          f"that the other hosts can reach")
    return addrs


def check_interface(name: str) -> None:
    """Raise ConfigError unless ``name`` is empty (torch's defaults) or names an interface
    of this host with an IPv4 address."""
    if name:
        interface_addresses(name)


def export_interface(name: str, environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Point gloo, TensorPipe, NCCL and our own listeners at interface ``name`` (nothing
    when empty). Must run before the process group and RPC start: the libraries read
    these variables once, when they make their listening sockets."""
    if not name:
        return
    env = os.environ if environ is None else environ
    for var in IFNAME_VARS + (ENV_INTERFACE,):
        if env.get(var, name) != name:
            log.warning("comm.interface=%s replaces %s=%s", name, var, env[var])
        env[var] = name


def configured_interface(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """The interface :func:`export_interface` set in this process ("" for none)."""
    return (os.environ if environ is None else environ).get(ENV_INTERFACE, "")


def store_address(master_addr: str, interface: str) -> str:
    """The address rank 0 binds the round's store to: the one MASTER_ADDR resolves to,
    which must be an address of ``interface`` (what the other hosts reach) or loopback
    (a job on one host). Anything else could not be reached where it is bound."""
    try:
        addr = socket.gethostbyname(master_addr)
    except OSError as e:
        raise RuntimeError(f"MASTER_ADDR {master_addr!r} does not resolve ({e})") from None
    own = interface_addresses(interface)
    if addr not in own and not ipaddress.ip_address(addr).is_loopback:
        raise RuntimeError(
            f"comm.interface: MASTER_ADDR {master_addr!r} resolves to {addr}, which is not an "
            f"address of interface {interface!r} ({', '.join(own)}): make this host's name "
            f"resolve to it, or give torchrun --local-addr {own[0]}")
    return addr


def serve_store(addr: str, port: int, *, timeout: float, world_size: Optional[int] = None,
                client_host: Optional[str] = None) -> "TCPStore":
    """A TCPStore server listening on ``addr:port`` only. torch's own server listens on
    every address (``::``) whatever host it is given (torch 2.13, both backends); so we
    bind the socket and the store serves on it (``master_listen_fd``, libuv backend).
    ``client_host``: how this process reaches it (default ``addr``)."""
    return serve_on(listen_socket(addr, port), client_host or addr, timeout=timeout,
                    world_size=world_size)


def listen_socket(addr: str, port: int, family: int = socket.AF_INET) -> socket.socket:
    """A socket listening on ``addr:port`` with the store's backlog; on ``::``, IPv4 too
    (one socket for both, as torch's own store server)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if addr == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((addr, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_on(sock: socket.socket, client_host: str, *, timeout: float,
             world_size: Optional[int] = None) -> "TCPStore":
    """A TCPStore server on a socket already listening; it owns the socket from then on.
    ``client_host``: how this process reaches it."""
    from torch.distributed import TCPStore

    try:
        store = TCPStore(client_host, sock.getsockname()[1], world_size,
                         is_master=True, timeout=timedelta(seconds=timeout),
                         wait_for_workers=False, use_libuv=True,
                         master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server closes it when it ends
    return store
