"""The entry point every worker runs.

On one machine (starts the workers for you)::

    python -m distqat.local [--config configs/tiny.yaml] [--nproc 4] [key=value ...]

On each of several hosts (all agents meet at HEAD:29400)::

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2:4 --nproc-per-node=2 \\
        --rdzv-backend=c10d --rdzv-endpoint=HEAD:29400 --rdzv-id=job1 \\
        -m distqat.train --config configs/tiny.yaml [key=value ...]

The single-process reference: ``python -m distqat.train mode=baseline``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import List, Optional

from .config import ConfigError, Config, load_config

log = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
TERM_GRACE_S = 5.0


def parse_args(argv: Optional[List[str]], prog: str = "distqat.train") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file (default configs/tiny.yaml)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("--print-run-dir", action="store_true",
                        help="check the config, print the run folder and exit (for launchers)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser.parse_args(argv)


def load_or_exit(config: Optional[str], overrides: List[str], *,
                 hold_round_port: bool = False) -> Config:
    """The config, or exit 2 with the message (no traceback for a user error). The
    schema is checked before torch is imported (a typo is reported at once); then the
    network interface (``comm.interface``, which is then exported to gloo, TensorPipe and
    our listeners: this runs in every worker before its process group), the device, the
    model's arguments (the registry imports torch) and the data (files there and readable,
    the expected columns, a hub dataset cached): all before any worker starts.
    ``hold_round_port``: a worker's, which listens on its round's port once it knows the
    interface, before the slow checks (:mod:`.elastic.round_port`)."""
    try:
        cfg = load_config(config, overrides)
        from .data import check_data
        from .devices import check_device
        from .elastic import round_port
        from .elastic.interface import check_interface, export_interface
        from .models import check_model

        check_interface(cfg.comm.interface)
        export_interface(cfg.comm.interface)
        if hold_round_port:
            round_port.hold(cfg.comm.interface)
        check_device(cfg.device)
        check_model(cfg.model_pipeline.model, cfg.model_pipeline.model_args)
        check_data(cfg.data)
        from . import faults  # noqa: F401  (parses the test-only variables: a typo fails here)
        return cfg
    except ConfigError as e:
        print(f"distqat: config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except ValueError as e:  # the model's arguments, the data (DataError)
        print(f"distqat: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # blocked before torch starts any thread, so that every thread leaves SIGTERM to the
    # one a worker starts for it (_watch_sigterm)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    cfg = load_or_exit(args.config, args.overrides, hold_round_port=True)
    if args.print_config:
        from .config import to_yaml
        print(to_yaml(cfg), end="")
        return 0
    if args.print_run_dir:
        print(cfg.run_path)
        return 0
    if cfg.mode == "baseline":
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        from .monitor.logs import setup_logging
        from .pipeline.baseline import run_baseline
        setup_logging(cfg.run_path, 0)
        try:
            run_baseline(cfg)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        return 0
    return run_worker(cfg)


def run_worker(cfg: Config) -> int:
    from .elastic import dist as dq_dist
    from .elastic.control import RoundEnded
    from .elastic.worker import Worker
    from .monitor.logs import setup_logging

    env = dq_dist.DistEnv.from_environ()
    try:
        cfg.check_world(env.world_size)
    except ConfigError as e:
        print(f"distqat: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(cfg.run_path, env.rank)
    worker = Worker(cfg, env)
    _watch_sigterm(worker)
    try:
        worker.setup()
        worker.run()
        return 0
    except RoundEnded as e:  # a member was lost: torchrun forms the next round without it
        worker.exit_reason = str(e)
        log.warning("%s", e)
        worker.record_stop(str(e))
        return 1
    except KeyboardInterrupt as e:
        worker.exit_reason = "interrupted"
        log.warning("interrupted%s", f" ({e})" if str(e) else "")
        worker.record_stop("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:
        worker.exit_reason = f"error: {e}"
        log.exception("worker failed")
        worker.record_stop(f"error: {e}")
        return 1
    finally:
        worker.close()


def _watch_sigterm(worker) -> None:
    """Take SIGTERM (blocked in every thread) in a thread of its own.

    Why: the agent stops its workers with SIGTERM, and kills them 30 s later. A Python
    signal handler runs only when the main thread runs Python, never while it waits in a
    collective or for an RPC answer, where a worker whose peer hangs or died often is: such
    a worker held every new round for 30 s. Here the main thread is interrupted as on
    Ctrl-C (it leaves the usual way, noting where it stopped); if it is still waiting in
    native code :data:`TERM_GRACE_S` later, the worker notes that and exits from here."""
    import _thread
    import threading
    import time

    def serve() -> None:
        signal.sigwait({signal.SIGTERM})
        log.warning("SIGTERM: leaving the round")
        _thread.interrupt_main()
        time.sleep(TERM_GRACE_S)
        log.warning("interrupted (signal 15) while waiting in native code: leaving now")
        worker.exit_reason = "interrupted"
        worker.record_stop("interrupted")
        exit_now_if_failed(EXIT_INTERRUPTED)

    threading.Thread(target=serve, name="sigterm", daemon=True).start()


def exit_now_if_failed(code: int) -> int:
    """A worker leaving a round that failed exits at once, without the interpreter's
    teardown: torch's RPC agent and process groups take ~2 s there to give up on a peer that
    is gone, and the agent forms the next round only once every worker has exited. What
    must survive is on disk already (logs, the stop note, checkpoints)."""
    if code != 0:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(exit_now_if_failed(main()))
