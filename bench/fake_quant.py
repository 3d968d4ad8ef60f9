"""Time one FakeQuantizer's forward and forward + backward, in one thread.

    python bench/fake_quant.py [--repeats 5] [--calls 1000]

What one quantized layer adds to a training step, per quantizer kind: an activation
quantizer (8-bit unsigned, asymmetric, per-tensor, running min/max) on a conv
activation, and a weight quantizer (8-bit signed, symmetric, per output channel, follows
the weight) on a conv weight. For scale, the same tensor through torch's own fused
``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` (with its backward),
and a float ``mul`` pass over the tensor. Then the cost of a bool mask against the float
mask distqat uses. Medians of ``--repeats`` timings of ``--calls`` calls each, in
microseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distqat.quant import FakeQuantizer  # noqa: E402


def per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    for _ in range(max(10, calls // 10)):  # warm-up
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    cases = [
        ("activation 64x16x8x8", (64, 16, 8, 8),
         FakeQuantizer(8, signed=False, symmetric=False, averaging_constant=0.1),
         lambda x, fq: torch.fake_quantize_per_tensor_affine(
             x, fq.scale, fq.zero_point.to(torch.int32), fq.qmin, fq.qmax)),
        ("weight 32x16x3x3", (32, 16, 3, 3),
         FakeQuantizer(8, per_channel=True, ch_axis=0, averaging_constant=1.0),
         lambda x, fq: torch.fake_quantize_per_channel_affine(
             x, fq.scale, fq.zero_point, 0, fq.qmin, fq.qmax)),
    ]
    print(f"# `python bench/fake_quant.py {' '.join(sys.argv[1:])}` (torch "
          f"{torch.__version__}, 1 thread; microseconds per call, median of {args.repeats} x "
          f"{args.calls} calls)\n")
    print("| tensor | ours: forward | ours: forward + backward | torch fused: forward "
          "| torch fused: forward + backward | one `mul` pass |")
    print("|---|---|---|---|---|---|")
    for label, shape, fq, fused in cases:
        x = torch.randn(*shape, requires_grad=True)
        grad = torch.randn(*shape)
        fq(x)  # first observation sizes the buffers
        row = [
            per_call_us(lambda: fq(x), args.calls, args.repeats),
            per_call_us(lambda: fq(x).backward(grad), args.calls, args.repeats),
            per_call_us(lambda: fused(x, fq), args.calls, args.repeats),
            per_call_us(lambda: fused(x, fq).backward(grad), args.calls, args.repeats),
            per_call_us(lambda: x.detach() * 0.5, args.calls, args.repeats),
        ]
        print(f"| {label} | " + " | ".join(f"{v:.0f}" for v in row) + " |", flush=True)

    # why the straight-through mask is float arithmetic (distqat.quant.fake_quant._in_range)
    r = torch.round(torch.randn(64, 16, 8, 8) * 40)
    clamped = r.clamp(0, 63)
    grad = torch.randn_like(r)
    bool_mask, float_mask = r == clamped, (r == clamped).float()
    ops = [("`r == clamped` (bool out)", lambda: r == clamped),
           ("`grad * bool_mask`", lambda: grad * bool_mask),
           ("float mask: `1 - min(|r - clamped|, 1)`",
            lambda: torch.rsub(torch.sub(r, clamped).abs_().clamp_(max=1.0), 1.0)),
           ("`grad * float_mask`", lambda: grad * float_mask),
           ("`r - clamped` (one float pass)", lambda: r - clamped)]
    print("\n| op on 64x16x8x8 float32 | microseconds |")
    print("|---|---|")
    for label, fn in ops:
        print(f"| {label} | {per_call_us(fn, args.calls, args.repeats):.0f} |", flush=True)


if __name__ == "__main__":
    main()
