"""Twins through the real launcher: what a compressed activation hop does to the gradient,
and a QAT pipeline against the QAT whole model in one process.

Every run takes one inner SGD step then one outer step with SGD lr 1 and no momentum, on
one replica: the outer step then leaves exactly the inner step's parameters (test_diloco
checks it), so ``final/stage*.pt`` holds ``p0 - lr * grad`` and the difference of two
runs' parameters is ``lr`` times the difference of their gradients.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F

from distqat.config import load_config
from distqat.data import make_task
from distqat.pipeline.build import IO_FILE, build_stages, stage_cuts

from conftest import Launcher

LR = 0.5
ONE_INNER_STEP = ("diloco.inner_steps=1", "diloco.outer_steps=1", "dtype=float64",
                  "diloco.inner_optim.name=sgd", f"diloco.inner_optim.lr={LR}",
                  "diloco.outer_optim.lr=1.0", "diloco.outer_optim.momentum=0",
                  "diloco.outer_optim.nesterov=false", "eval_every=0")
PIPE = ("--nproc", "2", *ONE_INNER_STEP, "model_pipeline.num_stages=2")
WIRE = {fmt: (*PIPE, "model_pipeline.num_microbatches=2", f"quant.wire.activations={fmt}")
        for fmt in ("fp32", "bf16", "int8")}
# one micro-batch: a stage's activation quantizers then observe the same batch, once per
# step, as the whole model's do (two micro-batches would move a running range twice)
QAT_PIPE = (*PIPE, "model_pipeline.num_microbatches=1", "quant.enable=true")
QAT_FULL = ("--nproc", "1", *ONE_INNER_STEP, "mode=baseline", "quant.enable=true")
RUNS = {**{f"wire-{k}": v for k, v in WIRE.items()}, "qat-pipe": QAT_PIPE, "qat-full": QAT_FULL}
RUN_TIMEOUT_S = 200


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """All runs of this file, started together (each spends half its time waiting on
    rendezvous and process start, so two cores run them side by side): name -> run folder."""
    base = tmp_path_factory.mktemp("twins")
    launchers, procs = {}, {}
    try:
        for name, args in RUNS.items():
            (base / name).mkdir()
            launchers[name] = Launcher(base / name)
            procs[name] = launchers[name].start(*args)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        done = {}
        for name, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}: {' '.join(RUNS[name])} ran past {RUN_TIMEOUT_S} s")
            done[name] = (proc.returncode, out, base / name / "runs" / "tiny")
        yield done
    finally:
        for launcher in launchers.values():
            launcher.close()


def run_dir(finished, name):
    code, out, path = finished[name]
    assert code == 0, f"{name}: {' '.join(RUNS[name])}\n{out[-4000:]}"
    return path


def stages_after(path):
    return [torch.load(p, weights_only=True) for p in sorted((path / "final").glob("stage*.pt"))]


def relative(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


# ------------------------------------------------------------------ the activation hops


def _bf16(t):
    """bf16 on the wire: 8 significant bits, round to nearest even."""
    return t.to(torch.bfloat16).to(t.dtype)


def _int8_rows(t):
    """int8 on the wire as documented in distqat.quant.wire, written out here: float32
    arithmetic, one scale per row = row absmax / 127, round half to even, +-127."""
    rows = t.to(torch.float32).reshape(t.shape[0], -1)
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    q = torch.clamp(torch.round(rows / torch.where(scale > 0, scale, 1.0)), -127, 127)
    return (q * scale).reshape(t.shape).to(t.dtype)


ROUND = {"fp32": None, "bf16": _bf16, "int8": _int8_rows}


class _Hop(torch.autograd.Function):
    """The hop in one process: the activation rounded forward, its gradient rounded back
    (straight through the rounding)."""

    @staticmethod
    def forward(ctx, h, rounding):
        ctx.rounding = rounding
        return rounding(h)

    @staticmethod
    def backward(ctx, grad):
        return ctx.rounding(grad), None


def _one_step_in_process(fmt):
    """Stage 0, the hop, stage 1 and the loss in this process: the stages' parameters
    after one SGD step on the batch replica 0 trains on first."""
    cfg = load_config(None, list(WIRE[fmt][2:]))
    task = make_task(cfg.data)
    stages = build_stages(cfg, task.model_io())
    s0, s1 = stages[0].double(), stages[1].double()
    x, y = task.batch(0, 0, cfg.diloco.batch_size_per_step)
    h = s0(x.double())
    if ROUND[fmt] is not None:
        h = _Hop.apply(h, ROUND[fmt])
    F.cross_entropy(s1(h), y).backward()
    with torch.no_grad():
        for p in list(s0.parameters()) + list(s1.parameters()):
            p -= LR * p.grad
    return [s0.state_dict(), s1.state_dict()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_compressed_hop_gradient_is_that_of_the_rounded_hop(finished, fmt):
    """The pipeline's step with a compressed hop is exactly the step of the same model
    with the hop's rounding inserted forward and backward in one process: the gradient
    crosses the RPC hop (int8: through the token and the mailbox) intact and straight
    through the rounding, nothing more is rounded and nothing is lost."""
    got = stages_after(run_dir(finished, f"wire-{fmt}"))
    want = _one_step_in_process(fmt)
    assert len(got) == len(want) == 2
    for stage, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w)
        for key in w:
            # float64 around the same roundings (bf16 casts, int8 in float32 as the wire
            # does): only the summation order differs (micro-batches, RPC); measured 3e-14
            assert relative(g[key], w[key]) <= 1e-10, (fmt, stage, key, relative(g[key], w[key]))


# The compressed hops against the fp32 hop, per parameter tensor:
#     |step_fmt - step_fp32| <= TOL[fmt] * |step_fp32|        (vector norms)
# with step = final - initial = -lr * grad: a bound on the gradient's relative error.
#
# Derivation. The hop rounds twice: the activation h forward (stage 1 works on the rounded
# one) and its gradient backward (stage 0's gradients are the Jacobian-transpose of the
# rounded one). A sample's gradient g_b then moves by at most 2 * eps * kappa * |g_b| to
# first order, eps the rounding's relative size, kappa the gain of the layers after it
# (ReLU MLP and softmax cross-entropy: about 1). The batch gradient is the sum of the
# samples' ones, whose directions largely cancel: |sum e_b| <= sum |e_b|, so relative to
# |sum g_b| the error is at most 2 * eps * C with C = sum |g_b| / |sum g_b| <= B. For
# independent directions C ~ sqrt(B) = 8 with B = 64 (measured on tiny.yaml at init:
# C = 6.2 to 7.3 per tensor), so we take C = 8:
#
# * bf16: eps = 2**-8 (8 significant bits, round to nearest): TOL = 2 * 2**-8 * 8 = 0.0625.
# * int8, one scale per row (absmax / 127, round to nearest): an element's error is at
#   most absmax / 254 = 2**-7.99 of the row's *largest* element; over a row of n elements
#   of rms size absmax / r that is r * 2**-8 of the row's norm. After a ReLU and for their
#   gradients r is about 3.6 here (measured max/rms of h's rows); we take r = 4:
#   TOL = 2 * 4 * 2**-8 * 8 = 0.25.
#
# Measured (tiny.yaml, float64): bf16 at most 0.019, int8 at most 0.063 of the step, on
# every tensor, both stages. The bound is loose by design (worst case over the rounding
# signs); the exact twin above is the sharp test. A hop that drops stage 0's gradient
# (error 1.0), or mis-scales it by 2 (1.0 or 0.5), is far outside.
B_CANCEL, INT8_ROW_RATIO = 8, 4
TOL = {"bf16": 2 * 2 ** -8 * B_CANCEL, "int8": 2 * INT8_ROW_RATIO * 2 ** -8 * B_CANCEL}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_compressed_hop_gradient_is_the_fp32_gradient_within_its_rounding(finished, fmt):
    ref_dir, got_dir = run_dir(finished, "wire-fp32"), run_dir(finished, f"wire-{fmt}")
    cfg = load_config(None, list(WIRE["fp32"][2:]))
    initial = build_stages(cfg, json.loads((ref_dir / IO_FILE).read_text()))
    ref, got = stages_after(ref_dir), stages_after(got_dir)
    assert len(ref) == len(got) == len(initial) == 2
    errors = {}
    for stage, (r, g) in enumerate(zip(ref, got)):
        p0 = {k: v.double() for k, v in initial[stage].state_dict().items()}
        assert set(r) == set(g) == set(p0)
        for key in p0:
            step_ref, step_got = r[key] - p0[key], g[key] - p0[key]
            # the gradient reached every parameter, on both sides of the hop
            assert torch.linalg.vector_norm(step_ref) > 1e-6, (stage, key)
            assert torch.linalg.vector_norm(step_got) > 1e-6, (stage, key)
            errors[f"stage{stage}.{key}"] = relative(step_got, step_ref)
    assert max(errors.values()) <= TOL[fmt], (fmt, TOL[fmt], errors)
    # and the compression did something: these are not the same run
    assert min(errors[k] for k in errors if k.startswith("stage0")) > 1e-6, (fmt, errors)


# ------------------------------------------------------------------ QAT pipeline vs whole


@pytest.mark.timeout(300)
def test_qat_pipeline_after_one_step_equals_the_qat_full_model(finished):
    pipe_dir, full_dir = run_dir(finished, "qat-pipe"), run_dir(finished, "qat-full")
    cfg = load_config(None, list(QAT_PIPE[2:]))
    cuts = stage_cuts(cfg, json.loads((pipe_dir / IO_FILE).read_text()))
    # stage s numbers its blocks from 0; the whole model from cuts[s]
    got = {}
    for stage, state in enumerate(stages_after(pipe_dir)):
        for key, value in state.items():
            head, rest = key.split(".", 1)
            got[f"{int(head) + cuts[stage]}.{rest}"] = value
    want = torch.load(full_dir / "final" / "full.pt", weights_only=True)
    assert len(cuts) == 3 and got
    assert set(got) == set(want)
    # quantizers are there (the QAT model, not the plain one) and were trained through
    assert any(k.endswith("act_fq.scale") for k in want), sorted(want)
    assert any(k.endswith("weight_fq.scale") for k in want), sorted(want)
    initial = build_stages(load_config(None, list(QAT_FULL[2:])),
                           json.loads((full_dir / IO_FILE).read_text()))[0].state_dict()
    moved = [k for k in want if want[k].is_floating_point() and k in initial
             and initial[k].shape == want[k].shape
             and not torch.equal(want[k], initial[k].to(want[k].dtype))]
    assert moved, "one inner step changed nothing"
    for key in want:
        if want[key].is_floating_point():
            # float64 end to end; only summation order differs (RPC, per-stage graphs)
            torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12,
                                       msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(got[key], want[key]), key
