"""Rank 0 holds MASTER_PORT as soon as it has read its config.

torch's agent picks MASTER_PORT by binding port 0 and letting it go; rank 0 serves the
round's store there (:func:`.dist.connect_store`) only after it has read its config,
checked its data and imported torch: seconds. Meanwhile another process's listener on port
0 (gloo's, TensorPipe's) may take that port, and the other ranks' store clients would talk
to it: it reads their bytes as a length and dies (``std::bad_alloc``). Listening before any
of that (its config read, no more) narrows the gap to well under a second. Light on
purpose: no torch here.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Mapping, Optional

from ..config import ConfigError
from .interface import listen_socket, store_address

ENV_RANK = "RANK"  # torchrun's variables (read by .dist too, which imports torch)
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_USE_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
# "host:port" of a store its launcher holds for the job (distqat.local): rank 0 serves none
ENV_LAUNCHER_STORE = "DISTQAT_LAUNCHER_STORE"

_held: Optional[socket.socket] = None


def hold(interface: Optional[str], environ: Mapping[str, str] = os.environ) -> None:
    """On rank 0 of a round whose store it serves: listen on MASTER_PORT now, on the
    address :func:`.interface.store_address` gives with ``comm.interface`` set, else on
    every address as torch's own store server does. Anything amiss (the port taken,
    MASTER_ADDR not on the interface) is left for the store to report."""
    global _held
    if (environ.get(ENV_RANK) != "0" or ENV_MASTER_PORT not in environ
            or environ.get(ENV_USE_AGENT_STORE) == "True" or environ.get(ENV_LAUNCHER_STORE)):
        return
    port = int(environ[ENV_MASTER_PORT])
    if interface:
        try:
            addr = store_address(environ.get(ENV_MASTER_ADDR, ""), interface)
        except (ConfigError, RuntimeError):
            return
        family = socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET
        places = [(family, addr)]
    else:
        places = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    for family, addr in places:
        try:
            _held = listen_socket(addr, port, family)
            return
        except OSError:
            continue


def take() -> Optional[socket.socket]:
    """The socket :func:`hold` listens on, once (whoever takes it owns it), or None."""
    global _held
    sock, _held = _held, None
    return sock
