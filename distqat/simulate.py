"""Predict a fleet's speed over slow links before renting it: ``python -m distqat.simulate``.

    python -m distqat.simulate --config configs/distilgpt2.yaml --hosts 8 --bandwidth 100mbit --latency 50ms
    python -m distqat.simulate --config configs/resnet18.yaml --hosts 4,16,64,512 \\
        --bandwidth 10mbit,100mbit,1gbit --plot fleet.png
    python -m distqat.simulate --config configs/tiny.yaml --profile     # measure this machine first
    python -m distqat.simulate --config configs/gptneo.yaml --hosts 8,64,512 --device h100 \\
        quant.wire.pseudo_grads=int8 diloco.inner_steps=100

Per scenario (every combination of ``--hosts``, ``--bandwidth`` and ``--latency``) it prints
the predicted seconds per inner and per outer step, the bytes one host sends per outer
step (activations, gradients, pseudo-gradients), compute utilisation, the fleet's
samples/s, and the same for DDP on the same hosts. The model and its formulas are in
:mod:`distqat.plan_cost`; the model's sizes and times come from :mod:`distqat.stage_times`.

Stage times: measured on this machine, with how much a step varies (replicas wait for the
slowest; ``--profile`` measures again; without it the kept
``runs/<experiment>/stage_times.json`` is read, or measured once if there is none for this
config), or from FLOPs at ``--device-flops`` FLOP/s or a ``--device`` from a small table
(peak x ``--mfu``; such steps never vary: ``--jitter 0.05`` makes them vary by 5 %).
``--calibrate`` also times a short real run of the config (``distqat.local``, one
pipeline: :mod:`distqat.step_calibration`) and scales the stages' compute to its inner
step, kept with the profile; it needs the config's data. A
host holds ``--workers-per-host`` workers (one device each); stages and replicas are
placed by distqat's own plan. ``--io key=value`` gives the model's data
shape when the task's data is not on this machine (without it, the task's settings and
what is known of the shipped configs' datasets and tokenizers stand in:
:data:`KNOWN_DATA`, :data:`KNOWN_VOCAB`).
Bad input exits 2 with one line naming the flag or field.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import plan_cost as pc
from .config import Config, ConfigError, load_config
from .stage_times import DEVICES

log = logging.getLogger(__name__)
PROG = "distqat.simulate"
_RATE = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
# tokenizers whose size is known without loading them (GPT-2's byte-level BPE)
KNOWN_VOCAB = {"distilgpt2": 50257, "gpt2": 50257, "EleutherAI/gpt-neo-125M": 50257,
               "EleutherAI/gpt-neo-1.3B": 50257}
# the shapes of the shipped configs' datasets, for when the data is not on this machine
KNOWN_DATA = {"uoft-cs/cifar10": {"side": 32, "classes": 10},
              "google/speech_commands": {"classes": 36}}


def _quantities(flag: str, text: str, units: Dict[str, float], example: str,
                positive: bool) -> List[float]:
    values = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*", item.lower())
        if not m or m.group(2) not in units:
            raise ConfigError(f"{flag}: expected a number with a unit ({', '.join(units)}), "
                              f"comma-separated (e.g. {example}), got {item.strip()!r}")
        value = float(m.group(1)) * units[m.group(2)]
        if positive and value <= 0:
            raise ConfigError(f"{flag}: expected a value > 0, got {item.strip()!r}")
        values.append(value)
    return values


def parse_hosts(text: str) -> List[int]:
    try:
        hosts = [int(h) for h in text.split(",")]
    except ValueError:
        hosts = []
    if not hosts or min(hosts) < 1:
        raise ConfigError(f"--hosts: expected host counts >= 1, comma-separated "
                          f"(e.g. 4,16,64), got {text!r}")
    return hosts


def parse_bandwidth(text: str) -> List[float]:
    """Bits per second from ``10mbit,1gbit`` (tc's bit units; tc's ``mbps`` means bytes)."""
    return _quantities("--bandwidth", text, _RATE, "100mbit,1gbit", positive=True)


def parse_latency(text: str) -> List[float]:
    return _quantities("--latency", text, _TIME, "50ms", positive=False)


def model_io(cfg: Config, given: Sequence[str]) -> Dict[str, Any]:
    """What the task tells the model builder; ``given`` (``key=value``) wins."""
    io: Dict[str, Any] = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--io: expected key=value (e.g. vocab_size=50257), got {item!r}")
        io[key] = json.loads(value) if value[:1] in "[0123456789" else value
    if io:
        return io
    from .data import make_task

    try:
        return make_task(cfg.data).model_io()
    except ValueError as e:  # the data is not here: the config may say enough
        io = _io_from_config(cfg)
        if io is not None:
            log.info("model io from the config (the data is not here): %s", io)
            return io
        raise ConfigError(f"--io: the task's data is not on this machine ({e}); give the "
                          f"model's io instead, e.g. --io vocab_size=50257 --io seq_len=128 "
                          f"or --io input_shape=[3,32,32] --io num_classes=10") from None


def _io_from_config(cfg: Config) -> Optional[Dict[str, Any]]:
    """The model's io from the task's settings and what is known of the shipped configs'
    datasets and tokenizers, or None where that is not enough."""
    from .data.task import task_args

    args, name = task_args(cfg.data), cfg.data.name
    known = KNOWN_DATA.get(cfg.data.dataset or "", {})
    if name == "text":
        vocab = 257 if args.tokenizer in (None, "byte") else KNOWN_VOCAB.get(args.tokenizer)
        return None if vocab is None else {"vocab_size": vocab, "seq_len": args.seq_len}
    classes = args.num_classes or known.get("classes") if args is not None else None
    if name == "image":
        side = args.image_size or known.get("side")
        if side and classes:
            return {"input_shape": [args.channels, side, side], "num_classes": classes}
    if name == "audio" and classes:
        return {"input_shape": [args.num_samples], "num_classes": classes}
    return None


def workload(cfg: Config, facts, times: dict, *, pseudo_allreduce: bool = False) -> pc.Workload:
    """The cost model's input from the config, the model's facts and the stage times."""
    from .stage_times import wire_bytes

    q, d, mp = cfg.quant.wire, cfg.diloco, cfg.model_pipeline
    # a short real run's inner step over the profile's (simulate --calibrate): the stages'
    # compute and the driver's scaled by it; the whole model's (DDP) and outer steps not
    scale = times.get("calibration", {}).get("scale", 1.0)
    stages = []
    for s, (fact, t) in enumerate(zip(facts.stages, times["stages"])):
        hop = wire_bytes(fact.out_shape, q.activations, facts.element_bytes)
        outer = t["outer"][q.pseudo_grads]
        stages.append(pc.StageCost(
            fwd_s=scale * t["fwd_s"], bwd_s=scale * t["bwd_s"], step_s=scale * t["step_s"],
            params=fact.params,
            float_buffers=fact.float_buffers, int_buffer_bytes=fact.int_buffer_bytes,
            act_bytes=hop + (facts.target_bytes if hop else 0), grad_bytes=hop,
            outer_local_s=outer["outer_local_s"], decode_s=outer["decode_s"],
            sd_s=t.get("sd_s", 0.0)))
    f = times["full"]
    buckets = pc.ddp_buckets([(n * facts.element_bytes, done) for n, done in facts.full_params])
    return pc.Workload(
        stages=tuple(stages), microbatches=mp.num_microbatches, batch=d.batch_size_per_step,
        inner_steps=d.inner_steps, schedule=mp.schedule, fragments=d.fragments,
        overlap_steps=d.overlap_steps if d.fragments > 1 else 0, pseudo_wire=q.pseudo_grads,
        element_bytes=facts.element_bytes, chunk_size=q.chunk_size,
        pseudo_allreduce=pseudo_allreduce,
        full=pc.FullCost(f["fwd_s"], f["bwd_s"], f["step_s"], buckets, f.get("sd_s", 0.0)),
        # measured by --profile (absent from older files and from FLOP-derived times: 0)
        rpc_s=times.get("rpc_s", 0.0), driver_s=scale * times.get("driver_s", 0.0),
        collective_s=times.get("collective_s", 0.0),
        links_share=cfg.comm.rpc_channels == "multiplexed")


def scenarios(w: pc.Workload, hosts: Sequence[int], bandwidths: Sequence[float],
              latencies: Sequence[float], workers_per_host: int = 1) -> List[Dict[str, Any]]:
    rows = []
    for h, bw, lat in itertools.product(hosts, bandwidths, latencies):
        fleet = pc.Fleet(h, pc.Link(bw, lat), workers_per_host)
        rows.append({"hosts": h, "bandwidth": bw, "latency": lat,
                     "diloco": asdict(pc.predict(w, fleet)),
                     "ddp": asdict(pc.predict_ddp(w, fleet))})
    return rows


def stage_times_for(cfg: Config, io, facts, args) -> tuple[dict, str]:
    """The stage times and a line saying where they come from."""
    from . import stage_times as st

    if args.device or args.device_flops:
        peak, membw = st.DEVICES[args.device] if args.device else (args.device_flops, None)
        flops = peak * args.mfu if args.device else args.device_flops
        membw = args.device_membw or membw
        where = (f"from FLOPs at {flops:.3g} FLOP/s ("
                 + (f"{args.device} peak {peak:.3g} x mfu {args.mfu}" if args.device
                    else "--device-flops") + ")"
                 + (f", memory {membw:.3g} B/s" if membw else ", optimizer and outer step free"))
        return st.device_times(facts, cfg.diloco.batch_size_per_step, flops, membw), where
    key = st.profile_key(cfg, io, facts)
    kept = None if args.profile else st.load_profile(cfg, key)
    path = cfg.run_path / st.PROFILE_FILE
    if kept is None:
        if not args.profile:
            print(f"{PROG}: no stage times for this config on this machine yet: measuring "
                  f"(kept in {path})", file=sys.stderr)
        from .stage_profile import profile
        kept = profile(cfg, io, facts, repeats=args.repeats, key=key)
        where = f"measured on this machine now ({kept['threads']} thread(s), kept in {path})"
    else:
        where = f"measured on this machine ({kept['threads']} thread(s), read from {path})"
    if args.calibrate:
        from .fileio import write_json
        from .step_calibration import needs_calibration, with_calibration
        if needs_calibration(cfg, kept, replicas=1):
            print(f"{PROG}: calibrating: a short run of distqat.local with this config",
                  file=sys.stderr)
            kept = with_calibration(cfg, facts, kept, replicas=1)
            write_json(path, kept, durable=False)
        c = kept["calibration"]
        where += (f", compute x{c['scale']:.3g} (a real run's inner step "
                  f"{c['run_step_s'] * 1e3:.4g} ms against the profile's "
                  f"{c['model_step_s'] * 1e3:.4g} ms: --calibrate)")
    return kept, where


def with_jitter(times: dict, share: float) -> dict:
    """``times`` with every step's standard deviation set to ``share`` of its mean."""
    def one(t: dict) -> dict:
        return dict(t, sd_s=share * (t["fwd_s"] + t["bwd_s"] + t["step_s"]))
    return dict(times, stages=[one(t) for t in times["stages"]], full=one(times["full"]))


def _mb(x: float) -> str:
    return f"{x / 1e6:.3g}"


def _rate(bw: float) -> str:
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bw >= scale:
            return f"{bw / scale:g}{unit}"
    return f"{bw:g}bit"


def report(cfg: Config, facts, times: dict, where: str, w: pc.Workload,
           rows: List[Dict[str, Any]]) -> str:
    mp, d, q = cfg.model_pipeline, cfg.diloco, cfg.quant.wire
    lines = [f"{mp.model}: {mp.num_stages} stage(s) (blocks {facts.cuts}), {mp.schedule} x "
             f"{mp.num_microbatches} micro-batch(es), batch {d.batch_size_per_step}, "
             f"inner_steps {d.inner_steps}, fragments {d.fragments}, activations {q.activations}, "
             f"pseudo-gradients {q.pseudo_grads}"
             + (" (ring all-reduce: not built)" if w.pseudo_allreduce else ""),
             f"stage times {where}"]
    for s, (fact, c) in enumerate(zip(facts.stages, w.stages)):
        lines.append(f"  stage {s}: {fact.params / 1e6:.3g}M params, per micro-batch of "
                     f"{facts.microbatch}: forward {c.fwd_s:.4g} s, backward {c.bwd_s:.4g} s, "
                     f"step {c.step_s:.4g} s (sd {c.sd_s:.3g} s), sends {_mb(c.act_bytes)} MB, "
                     f"outer step alone {c.outer_local_s:.4g} s")
    lines.append(f"  per RPC message {w.rpc_s * 1e3:.3g} ms, per collective call "
                 f"{w.collective_s * 1e3:.3g} ms, the driver's own work per inner step "
                 f"{w.driver_s * 1e3:.3g} ms")
    f = times["full"]
    lines.append(f"  whole model (DDP), batch {d.batch_size_per_step}: forward {f['fwd_s']:.4g} s,"
                 f" backward {f['bwd_s']:.4g} s, step {f['step_s']:.4g} s")
    head = ("hosts", "bandwidth", "latency", "replicas", "inner s", "outer s", "act MB",
            "grad MB", "pseudo MB", "util %", "samples/s", "| DDP step s", "DDP outer s",
            "DDP MB", "DDP util %", "DDP samples/s", "DiLoCo/DDP")
    table = [head]
    for r in rows:
        p, q2 = r["diloco"], r["ddp"]
        table.append((str(r["hosts"]), _rate(r["bandwidth"]), f"{r['latency'] * 1e3:g}ms",
                      str(p["replicas"]), f"{p['inner_s']:.4g}", f"{p['outer_s']:.4g}",
                      _mb(p["activation_bytes"]), _mb(p["gradient_bytes"]),
                      _mb(p["pseudo_grad_bytes"]), f"{100 * p['utilisation']:.1f}",
                      f"{p['samples_per_s']:.4g}", f"| {q2['step_s']:.4g}",
                      f"{q2['outer_s']:.4g}", _mb(q2["gradient_bytes"]),
                      f"{100 * q2['utilisation']:.1f}", f"{q2['samples_per_s']:.4g}",
                      f"{p['samples_per_s'] / q2['samples_per_s']:.3g}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines.append("")
    lines += ["  ".join(c.rjust(wd) for c, wd in zip(row, widths)) for row in table]
    lines.append("(MB: sent by one host per outer step, the largest over hosts; DDP's per "
                 "inner_steps steps, every worker a replica of the whole model)")
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: Path, title: str) -> None:
    """Utilisation and samples/s against hosts, one line per bandwidth (and latency),
    DiLoCo solid, DDP dashed, in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    links = sorted({(r["bandwidth"], r["latency"]) for r in rows})
    for i, (bw, lat) in enumerate(links):
        sel = sorted((r for r in rows if (r["bandwidth"], r["latency"]) == (bw, lat)),
                     key=lambda r: r["hosts"])
        hosts = [r["hosts"] for r in sel]
        label = f"{_rate(bw)}, {lat * 1e3:g} ms"
        color = f"C{i}"
        for key, style in (("diloco", "-"), ("ddp", "--")):
            name = "DiLoCo" if key == "diloco" else "DDP"
            axes[0].plot(hosts, [100 * r[key]["utilisation"] for r in sel], style, marker="o",
                         color=color, label=f"{name} {label}")
            axes[1].plot(hosts, [r[key]["samples_per_s"] for r in sel], style, marker="o",
                         color=color, label=f"{name} {label}")
    axes[0].set(xscale="log", xlabel="hosts", ylabel="compute utilisation %", ylim=(0, 100))
    axes[1].set(xscale="log", yscale="log", xlabel="hosts", ylabel="fleet samples/s")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML file (default configs/tiny.yaml)")
    p.add_argument("--hosts", default="2", help="host counts, e.g. 4,16,64 (default 2)")
    p.add_argument("--bandwidth", default="100mbit", help="per-host link, e.g. 10mbit,1gbit")
    p.add_argument("--latency", default="0ms", help="one-way latency per link, e.g. 50ms")
    p.add_argument("--workers-per-host", type=int, default=1, help="devices per host")
    p.add_argument("--profile", action="store_true", help="measure this machine's stage times")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement")
    p.add_argument("--calibrate", action="store_true",
                   help="scale the profile's compute to a short real run's inner step")
    p.add_argument("--device", choices=sorted(DEVICES), help="times from this device's FLOPs")
    p.add_argument("--device-flops", type=float, help="achieved FLOP/s per device")
    p.add_argument("--device-membw", type=float, help="memory bytes/s per device")
    p.add_argument("--mfu", type=float, default=0.4, help="share of --device's peak achieved")
    p.add_argument("--jitter", type=float, metavar="SHARE",
                   help="a step's standard deviation as a share of its mean, e.g. 0.05 "
                        "(replaces the profiled one; FLOP-derived steps never vary)")
    p.add_argument("--pseudo-allreduce", action="store_true",
                   help="compressed pseudo-gradients by a ring all-reduce (not built)")
    p.add_argument("--io", action="append", default=[], metavar="KEY=VALUE",
                   help="the model's data shape, when the task's data is not here")
    p.add_argument("--json", type=Path, help="also write every prediction here")
    p.add_argument("--plot", type=Path, help="utilisation and samples/s vs hosts (PNG)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        hosts, bws = parse_hosts(args.hosts), parse_bandwidth(args.bandwidth)
        lats = parse_latency(args.latency)
        if args.workers_per_host < 1:
            raise ConfigError(f"--workers-per-host: expected >= 1, got {args.workers_per_host}")
        if args.repeats < 1:
            raise ConfigError(f"--repeats: expected >= 1, got {args.repeats}")
        if args.device_flops is not None and args.device_flops <= 0:
            raise ConfigError(f"--device-flops: expected > 0 FLOP/s, got {args.device_flops}")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu: expected a share in (0, 1], got {args.mfu}")
        if args.calibrate and (args.device or args.device_flops):
            raise ConfigError("--calibrate: scales measured stage times; with --device or "
                              "--device-flops they come from FLOPs")
        if args.jitter is not None and not args.jitter >= 0:
            raise ConfigError(f"--jitter: expected a share >= 0 (0.05: 5 %), got {args.jitter}")
        if args.plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ConfigError("--plot: needs matplotlib (pip install matplotlib)") from None
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            if str(e).startswith("config file"):
                raise ConfigError(f"--config: {e}") from None
            raise
        if args.calibrate:  # its run trains on the config's data: checked before profiling
            from .data import check_data
            try:
                check_data(cfg.data)
            except ValueError as e:
                raise ConfigError(f"--calibrate: trains on the config's data: {e}") from None
        stages = cfg.model_pipeline.num_stages
        if min(hosts) * args.workers_per_host < stages:
            raise ConfigError(f"--hosts: {min(hosts)} host(s) x {args.workers_per_host} "
                              f"worker(s) cannot hold {stages} stages "
                              f"(model_pipeline.num_stages); use more hosts or "
                              f"--workers-per-host")
        from .compat import import_torchvision
        logging.getLogger("distqat.compat").setLevel(logging.ERROR)  # a CPU torch's repair
        import_torchvision()
        io = model_io(cfg, args.io)
        from .stage_times import model_facts
        facts = model_facts(cfg, io)
        times, where = stage_times_for(cfg, io, facts, args)
        if args.jitter is not None:
            times = with_jitter(times, args.jitter)
            where += f", steps varying by {100 * args.jitter:g} % (--jitter)"
        w = workload(cfg, facts, times, pseudo_allreduce=args.pseudo_allreduce)
        rows = scenarios(w, hosts, bws, lats, args.workers_per_host)
    except ValueError as e:  # ConfigError, and the model builders' own ValueErrors
        print(f"{PROG}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(report(cfg, facts, times, where, w, rows))
    if args.json:
        args.json.write_text(json.dumps({"where": where, "workload": asdict(w), "rows": rows},
                                        indent=1))
    if args.plot:
        plot(rows, args.plot, f"{cfg.model_pipeline.model}, {cfg.model_pipeline.num_stages} "
             f"stages, inner_steps {cfg.diloco.inner_steps}, pseudo-gradients "
             f"{cfg.quant.wire.pseudo_grads}")
        print(f"{PROG}: plot in {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
