"""A standalone c10d rendezvous store, so that no training host is a single point of
failure with the c10d backend.

    python launch/store.py --port 29400 [--host ADDR | --interface IFNAME]
    launch/host.sh --rdzv-endpoint STORE_HOST:29400 --external-store ...   # on every host

With plain c10d the store lives inside the agent that bound the endpoint: if that host
dies, every agent ends (RendezvousConnectionError). Run this on a machine that stays up
(a login node, the scheduler host); then any training host may die. Runs until stopped.

The agents unpickle the rendezvous state they read from this store, so whoever can write
to it can run code in them: give ``--host`` (an address of this machine) or
``--interface`` (e.g. ``wg0``) to listen there only; without either it listens on every
address, as torch's store does.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distqat.config import ConfigError  # noqa: E402
from distqat.elastic.interface import interface_addresses, serve_store  # noqa: E402

TIMEOUT_S = 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--host", default=None,
                       help="listen on this address only (default: every address)")
    where.add_argument("--interface", default=None,
                       help="listen on this network interface's IPv4 address only")
    args = parser.parse_args()
    if args.interface is not None:
        try:
            host = interface_addresses(args.interface, field="--interface")[0]
        except ConfigError as e:
            print(f"launch/store.py: {e}", file=sys.stderr)
            return 2
    else:
        host = args.host
    try:
        if host is None:
            from torch.distributed import TCPStore

            store = TCPStore("0.0.0.0", args.port, is_master=True, wait_for_workers=False,
                             timeout=timedelta(seconds=TIMEOUT_S), use_libuv=True)
            where_s = f"every address, port {store.port}"
        else:
            store = serve_store(host, args.port, timeout=TIMEOUT_S)
            where_s = f"{host}:{store.port} only"
    except (OSError, RuntimeError) as e:  # not this machine's address, or the port is taken
        print(f"launch/store.py: cannot listen on {host or 'every address'}:{args.port} ({e})",
              file=sys.stderr)
        return 2
    print(f"c10d store listening on {where_s}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
