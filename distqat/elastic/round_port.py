"""Rank 0 holds MASTER_PORT from its first moment.

torch's agent picks MASTER_PORT by binding port 0 and letting it go; rank 0 serves the
round's store there (:func:`.dist.connect_store`) only after it has read its config,
checked its data and imported torch: seconds. Meanwhile another process's listener on port
0 (gloo's, TensorPipe's) may take that port, and the other ranks' store clients would talk
to it: it reads their bytes as a length and dies (``std::bad_alloc``). Listening before any
of that narrows the gap to the interpreter's start. Light on purpose: no torch here.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping, Optional

from .interface import LISTEN_BACKLOG

ENV_USE_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
# "host:port" of a store its launcher holds for the job (distqat.local): rank 0 serves none
ENV_LAUNCHER_STORE = "DISTQAT_LAUNCHER_STORE"

_held: Optional[socket.socket] = None


def hold(environ: Mapping[str, str] = os.environ) -> None:
    """On rank 0 of a round whose store it serves: listen on MASTER_PORT now, on every
    address as torch's own store server does. A port already taken is left for the store
    to report."""
    global _held
    if (environ.get("RANK") != "0" or "MASTER_PORT" not in environ
            or environ.get(ENV_USE_AGENT_STORE) == "True" or environ.get(ENV_LAUNCHER_STORE)):
        return
    port = int(environ["MASTER_PORT"])
    for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # both families on one socket, as torch's store
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((addr, port))
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            continue
        _held = sock
        return


def take() -> Optional[socket.socket]:
    """The socket :func:`hold` listens on, once (whoever takes it owns it), or None."""
    global _held
    sock, _held = _held, None
    return sock
