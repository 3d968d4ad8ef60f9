"""Train on one machine: start N workers through torch's own elastic launcher.

    python -m distqat.local [--config PATH] [--nproc N] [--print-config] [key=value ...]

Each worker runs exactly what ``torchrun ... -m distqat.train`` runs on a cluster, with a
c10d rendezvous on 127.0.0.1 at a free port. N defaults to the config's ``world_size``.
At the end a short summary is printed; ``runs/<experiment_prefix>/summary.json`` holds it.
Ctrl-C stops every worker within seconds and still leaves a summary saying so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import List, Optional

from .config import Config, ConfigError, to_yaml
from .train import EXIT_INTERRUPTED, EXIT_USAGE, load_or_exit

# rendezvous settings measured in RECIPES.md: quick rounds, quick failure detection
RDZV_CONFIGS = {"last_call_timeout": 1, "keep_alive_interval": 1, "keep_alive_max_attempt": 3,
                "join_timeout": 120, "close_timeout": 5}
SHUTDOWN_GRACE_S = 10


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distqat.local",
                                     description="Train on one machine with N local workers.")
    parser.add_argument("--config", default=None, help="YAML file (default configs/tiny.yaml)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="number of worker processes (default: the config's world_size)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser.parse_args(argv)


def _summary_line(summary: dict) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    keys = ("exit_reason", "world_size", "num_stages", "num_replicas", "inner_steps_done",
            "outer_steps_done", "loss_first", "loss_last", "samples_per_s", "bytes_allreduced")
    return "  ".join(f"{k}={fmt(summary.get(k))}" for k in keys)


def launch(cfg: Config, nproc: int, config_path: Optional[str], overrides: List[str]) -> int:
    """Run the workers; return the exit status for the command line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .elastic.interface import serve_store
    from .elastic.round_port import ENV_LAUNCHER_STORE
    from .monitor.summary import read_summary, write_summary

    run_id = uuid.uuid4().hex[:12]  # the job id: workers see it as TORCHELASTIC_RUN_ID
    # each round gets a fresh store hosted by worker 0 (RECIPES.md: essential with RPC)
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cfg.comm.threads_per_worker)))
    # the rendezvous store, on loopback only (torch's own would listen on every address)
    store = serve_store("127.0.0.1", 0, timeout=RDZV_CONFIGS["join_timeout"])
    # and the round's store, held here from before the workers start (one round: no
    # restarts), rather than one on a port torch's agent picked and let go
    round_store = serve_store("127.0.0.1", 0, timeout=cfg.comm.init_timeout)
    os.environ[ENV_LAUNCHER_STORE] = f"127.0.0.1:{round_store.port}"
    launch_cfg = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=run_id,
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{store.port}",
        rdzv_configs={**RDZV_CONFIGS, "is_host": False}, max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn", local_addr="127.0.0.1", shutdown_timeout=SHUTDOWN_GRACE_S)
    args = (["-m", "distqat.train"] + (["--config", config_path] if config_path else [])
            + list(overrides) + [f"world_size={nproc}"])
    status, reason = 0, "completed"
    started = time.time()
    try:
        elastic_launch(launch_cfg, sys.executable)(*args)
    except ChildFailedError as e:
        status, reason = 1, f"error: a worker failed ({e.get_first_failure()[1].message})"
    except (SignalException, KeyboardInterrupt):
        status, reason = EXIT_INTERRUPTED, "interrupted"
    summary = read_summary(cfg.run_path)
    if summary is None or summary.get("run_id") != run_id:
        # the workers could not write it (killed before rank 0 got there)
        summary = {"run_id": run_id, "experiment_prefix": cfg.experiment_prefix,
                   "world_size": nproc, "num_stages": cfg.model_pipeline.num_stages,
                   "exit_reason": reason, "wall_seconds": time.time() - started}
        write_summary(cfg.run_path, summary)
    elif status != 0 and summary.get("exit_reason") == "completed":
        summary["exit_reason"] = reason
        write_summary(cfg.run_path, summary)
    print(f"distqat: {_summary_line(summary)}")
    print(f"distqat: summary in {cfg.run_path / 'summary.json'}; "
          f"tensorboard --logdir {cfg.run_dir}")
    return status


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_or_exit(args.config, args.overrides)
    nproc = args.nproc if args.nproc is not None else cfg.world_size
    try:
        if nproc < 1:
            raise ConfigError(f"--nproc: expected >= 1, got {nproc}")
        if cfg.mode == "baseline":
            nproc = 1
        cfg.world_size = nproc
        cfg.check_world(nproc)
    except ConfigError as e:
        print(f"distqat: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    return launch(cfg, nproc, args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
