"""What a job is doing, and steering it: ``python -m distqat.status RUN_DIR``.

    python -m distqat.status runs/tiny              # fleet, replicas, rounds, recoveries, ETA
    python -m distqat.status runs/tiny --json       # the same for scripts
    python -m distqat.status runs/tiny --watch      # refreshes until the job ends
    python -m distqat.status runs/tiny --save       # a snapshot at the next outer step
    python -m distqat.status runs/tiny --stop       # finish the current outer step, save, exit 0

It reads only the run folder (``runs/<experiment_prefix>``): the config, the job's history
(``fleet.json``, kept on the host of replica 0's driver), the drivers' progress files
(``live/``) and ``summary.json``; no network. Run it on a host that sees the run folder: on
a cluster with a shared filesystem that is any host, otherwise the host of replica 0's
driver (for the history) or any host of the job (for ``--stop`` and ``--save``, which
every worker relays to the whole job: :mod:`distqat.elastic.control`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import CONFIG_FILE, ConfigError, config_from_yaml
from .elastic import control
from .elastic.history import FLEET_FILE
from .fileio import read_json
from .monitor.live import read_live
from .monitor.summary import SUMMARY_FILE

EXIT_USAGE = 2
SILENT_AFTER_S = 120.0  # a progress file older than this (and 5 logging intervals) is silent
SHOWN = 5  # rounds and recoveries listed


class StatusError(ValueError):
    """A folder that is not a run folder; the message names it."""


def read_status(run_dir: Path, now: Optional[float] = None) -> Dict[str, Any]:
    """Everything the run folder says about its job, as one JSON-ready dict."""
    now = time.time() if now is None else now
    if not (run_dir / CONFIG_FILE).is_file():
        raise StatusError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); expected "
                          "runs/<experiment_prefix> of a job that has started")
    try:
        cfg = config_from_yaml((run_dir / CONFIG_FILE).read_text(), str(run_dir / CONFIG_FILE))
    except (ConfigError, OSError) as e:
        raise StatusError(f"{run_dir / CONFIG_FILE}: {e}") from None
    d = cfg.diloco
    fleet = read_json(run_dir / FLEET_FILE) or {}
    rounds: List[dict] = fleet.get("rounds", [])
    summary_path = run_dir / SUMMARY_FILE
    summary = read_json(summary_path)
    live = read_live(run_dir)
    if live:  # only the newest job's replicas, and only those of its latest round
        job = max(live.values(), key=lambda r: r["updated"])["job"]
        live = {r: v for r, v in live.items() if v.get("job") == job}
        if rounds:
            live = {r: v for r, v in live.items() if r < rounds[-1]["num_replicas"]}
    newest = max((v["updated"] for v in live.values()), default=None)
    rates = [v["steps_per_s"] for v in live.values() if v.get("steps_per_s")]
    ended_at = summary_path.stat().st_mtime if summary is not None else None
    latest_start = max([t for t in [newest, rounds[-1]["started"] if rounds else None]
                        if t is not None], default=None)
    if ended_at is not None and (latest_start is None or ended_at >= latest_start):
        state = "ended"
    elif newest is None:
        state = "starting" if rounds else "unknown"  # no progress here (another host's?)
    else:
        interval = cfg.log_every / min(rates) if rates else 0.0
        state = "running" if now - newest <= max(SILENT_AFTER_S, 5 * interval) else "silent"
    total = d.outer_steps * d.inner_steps
    done = min((v["inner_steps_done"] for v in live.values()), default=0)
    outer_done = min((v["outer_steps_done"] for v in live.values()), default=0)
    started = rounds[0]["started"] if rounds else None
    last = rounds[-1] if rounds else {}
    status = {
        "run_dir": str(run_dir), "state": state,
        "job": next(iter(live.values()))["job"] if live else (summary or {}).get("run_id"),
        "model": cfg.model_pipeline.model, "num_stages": cfg.model_pipeline.num_stages,
        "world_size": last.get("world_size"), "complete_pipelines": last.get("num_replicas"),
        "started": started,
        "elapsed_s": ((ended_at if state == "ended" else now) - started) if started else None,
        "inner_steps_total": total, "inner_steps_done": done, "outer_steps_total": d.outer_steps,
        "outer_steps_done": outer_done,
        "eta_s": (total - done) / min(rates) if rates and state == "running" else None,
        "replicas": [{
            "replica": r, "host": v.get("host"), "outer_steps_done": v["outer_steps_done"],
            "inner_steps_done": v["inner_steps_done"], "loss": v.get("loss"),
            "samples_per_s": v.get("samples_per_s"), "eval": v.get("eval"),
            "seconds_since_update": now - v["updated"]} for r, v in sorted(live.items())],
        "restarts": fleet.get("restarts", 0),
        "rounds": rounds[-SHOWN:], "recoveries": fleet.get("recoveries", [])[-SHOWN:],
        "pending_requests": control.pending(run_dir),
        "exit_reason": summary.get("exit_reason") if state == "ended" else None,
        "summary": summary if state == "ended" else None,
    }
    if not rounds:
        status["note"] = (f"no {FLEET_FILE} here: the job's history and progress are kept on "
                          "the hosts of its drivers (replica 0's for the history)")
    return status


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _num(value: Optional[float], spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def format_status(s: Dict[str, Any]) -> str:
    state = s["state"].upper() + (f" ({s['exit_reason']})" if s["exit_reason"] else "")
    lines = [f"{s['run_dir']}: {state}, job {s['job'] or '?'}",
             f"model {s['model']}, {s['num_stages']} stages; world size "
             f"{s['world_size'] if s['world_size'] is not None else '?'}, complete pipelines "
             f"{s['complete_pipelines'] if s['complete_pipelines'] is not None else '?'}"]
    if s["started"] is not None:
        lines.append(f"started {_clock(s['started'])}, elapsed {_duration(s['elapsed_s'])}, "
                     f"{s['restarts']} restart(s)")
    percent = 100 * s["inner_steps_done"] / max(1, s["inner_steps_total"])
    lines.append(f"progress: outer step {s['outer_steps_done']}/{s['outer_steps_total']}, inner "
                 f"step {s['inner_steps_done']}/{s['inner_steps_total']} ({percent:.0f}%)"
                 + (f", ETA {_duration(s['eta_s'])}" if s["eta_s"] is not None else ""))
    if s["replicas"]:
        lines.append(f"{'replica':>8} {'outer':>6} {'inner':>7} {'loss':>9} {'samples/s':>10} "
                     f"{'updated':>9}  host")
        for r in s["replicas"]:
            lines.append(f"{r['replica']:>8} {r['outer_steps_done']:>6} {r['inner_steps_done']:>7} "
                         f"{_num(r['loss']):>9} {_num(r['samples_per_s'], '.1f'):>10} "
                         f"{_duration(r['seconds_since_update']) + ' ago':>9}  {r['host']}")
    for rnd in s["rounds"]:
        lines.append(f"round at {_clock(rnd['started'])}: world size {rnd['world_size']}, "
                     f"{rnd['num_replicas']} pipeline(s), from outer step "
                     f"{rnd['resumed_from_outer_step']}")
    for rec in s["recoveries"]:
        lines.append(f"recovery: {rec.get('seconds', 0):.1f} s, {rec['steps_lost']} inner steps "
                     f"lost, resumed from outer step {rec['resumed_from_outer_step']}, loss "
                     f"{_num(rec.get('loss_before'))} -> {_num(rec.get('loss_after'))}")
    for kind, req in s["pending_requests"].items():
        lines.append(f"pending: {kind} request from {req.get('host')} at {_clock(req['time'])}")
    if s["summary"]:
        sm = s["summary"]
        lines.append(f"summary: loss {_num(sm.get('loss_first'))} -> {_num(sm.get('loss_last'))}, "
                     f"{_num(sm.get('samples_per_s'), '.1f')} samples/s")
    if s.get("note"):
        lines.append(s["note"])
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distqat.status",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run folder, runs/<experiment_prefix>")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="print the status as JSON")
    group.add_argument("--watch", action="store_true", help="refresh until the job ends")
    group.add_argument("--save", action="store_true",
                       help="snapshot the stages at the next outer step (runs/.../saved/)")
    group.add_argument("--stop", action="store_true",
                       help="finish the current outer step, save, exit 0 on every host")
    parser.add_argument("--interval", type=float, default=2.0, help="--watch refresh seconds")
    return parser.parse_args(argv)


def _request(run_dir: Path, kind: str, status: Dict[str, Any]) -> str:
    if status["state"] == "ended":
        raise StatusError(f"{run_dir}: the job has ended ({status['exit_reason']}); "
                          f"nothing to {kind}")
    req = control.request(run_dir, kind)
    what = ("stops after its current outer step and saves" if kind == control.STOP
            else "saves its stages after its next outer step, in saved/")
    warning = "" if status["state"] == "running" else \
        f" (the job is {status['state']}: it acts on the request once it trains again)"
    return f"distqat: {kind} request {req['id']} left in {run_dir}; the job {what}{warning}"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        status = read_status(args.run_dir)
        if args.stop or args.save:
            print(_request(args.run_dir, control.STOP if args.stop else control.SAVE, status))
        elif args.json:
            print(json.dumps(status, indent=2, sort_keys=True))
        elif args.watch:
            clear = "\033[H\033[J" if sys.stdout.isatty() else ""
            while True:
                print(clear + format_status(status), flush=True)
                if status["state"] == "ended":
                    break
                time.sleep(args.interval)
                status = read_status(args.run_dir)
        else:
            print(format_status(status))
    except StatusError as e:
        print(f"distqat: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
