"""The model families at their real sizes on this machine.

    python bench/models.py [--families resnet18 ...] [--repeats 3] [--skip-runs]

1. Per family (each measurement in a fresh process, 2 threads): parameters, forward +
   backward seconds of one batch of 8 (median of ``--repeats``), and the peak RSS while
   building only stage s of an S-stage cut (``build_stages``, as a worker does) against
   building ``.full``, both above the RSS of the process once torch and distqat are
   imported with transformers (so: the model's bytes plus what building them cost, no
   batch yet).
2. resnet18 at CIFAR shape, 2 stages x 2 replicas against ``mode=baseline``, through
   ``python -m distqat.local`` on CIFAR-schema data written to a temp folder: samples/s
   from summary.json (medians of ``--repeats``, interleaved).
3. Seconds from starting ``python -m distqat.local`` to the first inner step (rank 0's log
   says ``step 1``) for resnet18 and distilgpt2 (the latter with the byte tokenizer: the
   generated text has no GPT-2 vocabulary; the model is the real 6-layer shape).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # hub_datasets: data in the hub's schemas

BATCH = 8
FAMILIES = {  # name -> (task io, model_args at the real size, stages to cut into)
    "resnet18": ({"input_shape": [3, 32, 32], "num_classes": 10}, {}, 2),
    "resnet50": ({"input_shape": [3, 32, 32], "num_classes": 10}, {}, 2),
    "resnet101": ({"input_shape": [3, 32, 32], "num_classes": 10}, {}, 2),
    "distilgpt2": ({"vocab_size": 50257, "seq_len": 128}, {}, 2),
    "gptneo": ({"vocab_size": 50257, "seq_len": 128}, {}, 4),
    "wav2vec2": ({"input_shape": [16000], "num_classes": 36}, {}, 2),
}

MEASURE = r"""
import json, sys, time, psutil, torch
from distqat.config import load_config
from distqat.models import sample_input
from distqat.pipeline.build import build_stages
from distqat.models.hf import import_transformers
torch.set_num_threads(2)
import_transformers()  # part of the footprint every worker has, like torch
family, io, args, stages, which, repeats = json.loads(sys.argv[1])
base = psutil.Process().memory_info().rss
cfg = load_config(None, [f"model_pipeline.model={family}", f"model_pipeline.num_stages={stages}",
                         f"world_size={stages}", "mode=" + ("baseline" if which == "full" else "pipeline")])
cfg.model_pipeline.model_args = args
part = build_stages(cfg, io, None if which == "full" else [which])
module = torch.nn.Sequential(*[b for s in sorted(part) for b in part[s]])
import resource  # peak RSS so far (KiB on Linux): building the model, before any batch
out = {"params": sum(p.numel() for p in module.parameters()),
       "bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
       "build_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
if which == "full":
    x = sample_input(io, batch=%d)
    if x.is_floating_point():
        x = torch.randn_like(x)
    else:
        x = torch.randint(0, io["vocab_size"], x.shape)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        module(x).float().mean().backward()
        times.append(time.perf_counter() - t0)
        module.zero_grad(set_to_none=True)
    out["fwd_bwd_s"] = sorted(times[1:])[len(times[1:]) // 2]
out["base_rss"] = base
print(json.dumps(out))
""" % BATCH


def measure(family: str, which, repeats: int) -> dict:
    io, args, stages = FAMILIES[family]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", MEASURE,
                           json.dumps([family, io, args, stages, which, repeats])],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{family} {which}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def family_table(families, repeats: int) -> None:
    print("| model | params | fwd+bwd s (batch 8) | stage | stage params | stage RSS above base "
          "| .full RSS above base | stage / full |")
    print("|---|---|---|---|---|---|---|---|")
    for family in families:
        full = measure(family, "full", repeats)
        stages = FAMILIES[family][2]
        full_rss = full["build_peak_rss"] - full["base_rss"]
        for s in (0, stages - 1):
            part = measure(family, s, 0)
            part_rss = part["build_peak_rss"] - part["base_rss"]
            print(f"| {family} | {full['params'] / 1e6:.1f}M | {full['fwd_bwd_s']:.2f} | "
                  f"{s}/{stages} | {part['params'] / 1e6:.1f}M | {part_rss / 2**20:.0f} MiB | "
                  f"{full_rss / 2**20:.0f} MiB | {part_rss / full_rss:.2f} |", flush=True)


def _local(cwd: Path, args, timeout: float = 900):
    """Start distqat.local in ``cwd``; return (seconds to rank 0's first step, summary)."""
    env = dict(os.environ, DISTQAT_NO_PROGRESS="1")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "distqat.local", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    log = None
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        logs = list((cwd / "runs").glob("*/logs/rank0.log"))
        log = logs[0] if logs else None
        if first is None and log is not None and " step 1 offset" in log.read_text():
            first = time.monotonic() - t0
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    if proc.returncode != 0:
        raise RuntimeError(f"distqat.local {' '.join(args)} failed:\n{out[-3000:]}")
    summary = json.loads(next((cwd / "runs").glob("*/summary.json")).read_text())
    return first, summary


def runs(repeats: int) -> None:
    from hub_datasets import cifar_like, wikitext_like

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cifar = cifar_like(tmp / "cifar", n_train=2000)
        text = wikitext_like(tmp / "wikitext", n_train=3000)
        steps = ["diloco.inner_steps=10", "diloco.outer_steps=2", "eval_every=0"]
        rates = {"pipeline": [], "baseline": []}
        firsts = {"resnet18": [], "distilgpt2": []}
        for i in range(repeats):  # interleaved, so a slow spell hits both alike
            for mode, extra in (("pipeline", []), ("baseline", ["mode=baseline"])):
                cwd = tmp / f"r18-{mode}-{i}"
                cwd.mkdir()
                first, summary = _local(cwd, ["--config", str(ROOT / "configs/resnet18.yaml"),
                                              f"data.path={cifar}", *steps, *extra])
                rates[mode].append(summary["samples_per_s"])
                if mode == "pipeline":
                    firsts["resnet18"].append(first)
            cwd = tmp / f"gpt-{i}"
            cwd.mkdir()
            first, _ = _local(cwd, ["--config", str(ROOT / "configs/distilgpt2.yaml"),
                                    f"data.path={text}", "data.args.tokenizer=byte",
                                    "diloco.inner_steps=1", "diloco.outer_steps=1",
                                    "eval_every=0"])
            firsts["distilgpt2"].append(first)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"\nresnet18 CIFAR shape, batch 64: 2 stages x 2 replicas "
              f"{med['pipeline']:.1f} samples/s {rates['pipeline']}, baseline "
              f"{med['baseline']:.1f} {rates['baseline']}, ratio "
              f"{med['pipeline'] / med['baseline']:.2f}")
        for name, values in firsts.items():
            print(f"{name}: start to first inner step, median {statistics.median(values):.1f} s "
                  f"{[round(v, 1) for v in values]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-runs", action="store_true", help="only the per-family table")
    args = parser.parse_args()
    family_table(args.families, args.repeats)
    if not args.skip_runs:
        runs(args.repeats)


if __name__ == "__main__":
    main()
