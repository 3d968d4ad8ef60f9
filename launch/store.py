"""A standalone c10d rendezvous store, so that no training host is a single point of
failure with the c10d backend.

    python launch/store.py --port 29400 [--host 0.0.0.0]
    launch/host.sh --rdzv-endpoint STORE_HOST:29400 --external-store ...   # on every host

With plain c10d the store lives inside the agent that bound the endpoint: if that host
dies, every agent ends (RendezvousConnectionError). Run this on a machine that stays up
(a login node, the scheduler host); then any training host may die. Runs until stopped.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import timedelta

from torch.distributed import TCPStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args()
    store = TCPStore(args.host, args.port, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=60), use_libuv=True)
    print(f"c10d store listening on {args.host}:{store.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
