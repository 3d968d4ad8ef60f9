"""distqat.simulate: the cost model on cases worked out by hand, the model's sizes from the
model itself, --profile's stage times read back, the CLI's errors, and one throttled
two-namespace run against its prediction (bench/simulate_check.py's testbed)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from distqat import plan_cost as pc
from distqat import simulate as sim
from distqat.config import load_config

TINY = str(ROOT / "configs" / "tiny.yaml")
BYTES_1MB_S = pc.Link(bandwidth=8e6, latency=0.0, efficiency=1.0)  # beta = 1e6 bytes/s


def _stage(**kw) -> pc.StageCost:
    base = dict(fwd_s=0.0, bwd_s=0.0, step_s=0.0, params=0)
    return pc.StageCost(**{**base, **kw})


# ---------------------------------------------------------------- formulas by hand

def test_collectives_as_written():
    link = pc.Link(bandwidth=8e6, latency=0.01, efficiency=1.0)
    # all-reduce of N = 1 MB over n = 4 ranks at 1 MB/s: 2(n-1)/n N/B + 2(n-1) alpha
    assert pc.allreduce_s(1e6, 4, link) == pytest.approx(1.5 + 0.06)
    assert pc.allreduce_sent(1e6, 4) == pytest.approx(1.5e6)
    # all-gather, each rank 1 MB: (n-1) N/B + (n-1) alpha
    assert pc.allgather_s(1e6, 4, link) == pytest.approx(3.0 + 0.03)
    assert pc.allgather_sent(1e6, 4) == pytest.approx(3e6)
    assert pc.allreduce_s(1e6, 1, link) == pc.allgather_s(1e6, 1, link) == 0.0
    # the default efficiency: 100 Mbit/s carries 0.95 * 12.5 MB/s of payload
    assert pc.Link(100e6).beta == pytest.approx(11.875e6)


def test_one_stage_one_replica():
    st = _stage(fwd_s=0.1, bwd_s=0.2, step_s=0.05, params=1000, outer_local_s=0.02)
    w = pc.Workload(stages=(st,), microbatches=2, batch=8, inner_steps=10)
    p = pc.predict(w, pc.Fleet(1, pc.Link(100e6)))
    inner = 2 * (0.1 + 0.2) + 0.05
    assert p.replicas == 1 and p.spares == 0
    assert p.inner_s == pytest.approx(inner)
    assert p.sync_s == pytest.approx(0.02)  # alone: no collective, no RPC
    assert p.outer_s == pytest.approx(10 * inner + 0.02)
    assert p.samples_per_s == pytest.approx(8 * 10 / (10 * inner + 0.02))
    assert p.utilisation == pytest.approx(10 * inner / (10 * inner + 0.02))
    assert p.pseudo_grad_bytes == p.activation_bytes == p.gradient_bytes == 0


@pytest.mark.parametrize("wire,seconds,sent", [
    ("fp32", 1.0, 1e6),  # AR: 2(2-1)/2 * 1 MB / 1 MB/s
    ("bf16", 0.5, 5e5),  # AG of 2 bytes per element: (2-1) * 0.5 MB
    ("int8", (250_000 + 4 * 62) / 1e6, 250_000 + 4 * 62),  # AG of values + one scale / 4096
])
def test_two_replicas_average_over_the_link(wire, seconds, sent):
    st = _stage(fwd_s=0.01, params=250_000, outer_local_s=0.003, decode_s=0.001)
    w = pc.Workload(stages=(st,), microbatches=1, batch=4, inner_steps=5, pseudo_wire=wire)
    p = pc.predict(w, pc.Fleet(2, BYTES_1MB_S))
    decode = 0.0 if wire == "fp32" else 0.001  # one peer's payload
    assert p.replicas == 2
    assert p.sync_s == pytest.approx(seconds + 0.003 + decode)
    assert p.outer_s == pytest.approx(5 * 0.01 + p.sync_s)
    assert p.pseudo_grad_bytes == pytest.approx(sent)
    assert p.samples_per_s == pytest.approx(2 * 4 * 5 / p.outer_s)


def test_every_collective_call_pays_gamma_once():
    """int8 between two: values in k = ceil(250 kB / 64 kB) = 4 pieces, scales in 1, each
    a call; fp32: one all-reduce; DDP: one call per bucket (1 MiB, then the rest)."""
    st = _stage(fwd_s=0.01, params=250_000)
    gamma = 0.002
    for wire, calls in (("int8", 4 + 1), ("fp32", 1)):
        plain, with_gamma = (pc.predict(pc.Workload(stages=(st,), microbatches=1, batch=4,
                                                    inner_steps=5, pseudo_wire=wire,
                                                    collective_s=g), pc.Fleet(2, BYTES_1MB_S))
                             for g in (0.0, gamma))
        assert with_gamma.sync_s - plain.sync_s == pytest.approx(calls * gamma), wire
    full = pc.FullCost(0.0, 0.0, 0.0, buckets=((1 << 20, 1.0), (5e6, 1.0)))
    plain, with_gamma = (pc.predict_ddp(pc.Workload(stages=(st,), microbatches=1, batch=4,
                                                    inner_steps=1, full=full, collective_s=g),
                                        pc.Fleet(2, BYTES_1MB_S)) for g in (0.0, gamma))
    assert with_gamma.step_s - plain.step_s == pytest.approx(2 * gamma)


def test_integer_buffers_are_broadcast_down_a_binomial_tree():
    # e.g. GPT-Neo's causal masks (bool): DiLoCo takes them from the first rank every time
    st = _stage(params=0, int_buffer_bytes=1_000_000)
    w = pc.Workload(stages=(st,), microbatches=1, batch=1, inner_steps=1)
    p = pc.predict(w, pc.Fleet(4, BYTES_1MB_S))
    assert p.sync_s == pytest.approx(2.0)  # ceil(log2 4) sends of 1 MB from the root
    assert p.pseudo_grad_bytes == pytest.approx(2e6)


def test_gpipe_and_1f1b_on_two_hosts():
    """Two stages on two hosts, 2 micro-batches, 0.5 s hops each way: the flow shop gives
    forward 1,2 | hop 1.5,2.5 | stage 1: 2.5,3.5 and backward 2,4 | 2.5,4.5 | 4.5,6.5."""
    a = _stage(fwd_s=1.0, bwd_s=2.0, step_s=0.1, params=10, act_bytes=5e5, grad_bytes=5e5)
    b = _stage(fwd_s=1.0, bwd_s=2.0, step_s=0.2, params=10)
    for schedule in ("gpipe", "1f1b"):
        w = pc.Workload(stages=(a, b), microbatches=2, batch=2, inner_steps=1,
                        schedule=schedule)
        assert pc.inner_step_s(w, [BYTES_1MB_S]) == pytest.approx(3.5 + 6.5 + 0.2), schedule
    p = pc.predict(pc.Workload(stages=(a, b), microbatches=2, batch=2, inner_steps=3),
                   pc.Fleet(2, BYTES_1MB_S))
    assert p.replicas == 1
    assert p.activation_bytes == pytest.approx(3 * 2 * 5e5)  # H M a_s, sent by host 0
    assert p.gradient_bytes == pytest.approx(3 * 2 * 5e5)  # sent back by host 1
    # same host: the hop is loopback RPC, nearly free
    assert pc.inner_step_s(pc.Workload(stages=(a, b), microbatches=2, batch=2, inner_steps=1),
                           [pc.LOCAL]) < 3.5 + 6.5 + 0.2 - 0.9


def test_a_link_carries_micro_batches_one_at_a_time_or_shared():
    assert pc.shared([0.0, 0.0], 1.0) == [2.0, 2.0]  # both on the link at once
    assert pc.shared([0.0, 0.5], 1.0) == [1.5, 2.0]  # half alone, then halves
    assert pc.shared([0.0, 2.0], 1.0) == [1.0, 3.0]  # one after the other
    # three stages, two micro-batches sent f apart. One TCP connection per pair (single):
    # each hop carries them in turn, the second micro-batch crosses hop 0 while the first
    # crosses hop 1: 3h + 3f. Sixteen connections (multiplexed): each hop carries both at
    # once, the first across at 2h, the second f later (measured so with TensorPipe
    # here), so the pipeline overlaps nothing: 4h + 2f
    f, h = 0.001, 0.22
    shop = [(f, 0.0, False), (h, 0.0, True), (f, 0.0, False), (h, 0.0, True), (f, 0.0, False)]
    assert pc.flow_shop(shop, 2) == pytest.approx(3 * h + 3 * f)
    assert pc.flow_shop(shop, 2, links_share=True) == pytest.approx(4 * h + 2 * f)
    a = _stage(fwd_s=f, act_bytes=h * 1e6, grad_bytes=h * 1e6, params=1)
    three = (a, a, _stage(fwd_s=f, params=1))
    single, multiplexed = (pc.Workload(stages=three, microbatches=2, batch=2, inner_steps=1,
                                       links_share=share) for share in (False, True))
    # forward and backward (no backward compute here) each save one h
    assert (pc.inner_step_s(multiplexed, [BYTES_1MB_S] * 2)
            - pc.inner_step_s(single, [BYTES_1MB_S] * 2)) == pytest.approx(2 * h - f)


def test_latency_terms():
    link = pc.Link(bandwidth=1e12, latency=0.05)
    a = _stage(fwd_s=0.1, act_bytes=1, grad_bytes=1, params=1)
    b = _stage(fwd_s=0.1, params=1)
    w = pc.Workload(stages=(a, b), microbatches=1, batch=1, inner_steps=1)
    # one micro-batch: forward hop, loss back, its gradient out, backward hop: 4 alpha,
    # then the step RPC (2 alpha)
    assert pc.inner_step_s(w, [link]) == pytest.approx(0.2 + 6 * 0.05, rel=1e-6)


def test_rpc_message_and_driver_terms():
    link = pc.Link(bandwidth=1e12, latency=0.05)
    a = _stage(fwd_s=0.1, act_bytes=1, grad_bytes=1, params=1)
    b = _stage(fwd_s=0.1, params=1)
    w = pc.Workload(stages=(a, b), microbatches=1, batch=1, inner_steps=1, rpc_s=0.01,
                    driver_s=0.003)
    # every message on the path pays alpha + mu: the 4 of test_latency_terms and the step
    # RPC's 2, then the driver's own work once
    assert pc.inner_step_s(w, [link]) == pytest.approx(0.2 + 6 * 0.06 + 0.003, rel=1e-6)
    # the outer step: the driver's call to stage 1 and back, 2 (alpha + mu)
    p = pc.predict(w, pc.Fleet(2, link))
    assert p.sync_s == pytest.approx(2 * 0.06, rel=1e-6)
    # one stage: no RPC at all; the driver's work still counts
    one = pc.Workload(stages=(_stage(fwd_s=0.1, params=1),), microbatches=1, batch=1,
                      inner_steps=1, rpc_s=0.01, driver_s=0.003)
    assert pc.inner_step_s(one, []) == pytest.approx(0.103)


def test_all_gather_pieces_pay_latency_each():
    from distqat import diloco

    assert (pc.AG_PIECE_BYTES, pc.AG_MAX_PIECES, pc.AG_PIECE_SECONDS, pc.AG_PROBE_BYTES) == (
        diloco.ALLGATHER_CHUNK_BYTES, diloco.ALLGATHER_MAX_PIECES,
        diloco.ALLGATHER_PIECE_SECONDS, diloco.PROBE_BYTES)
    assert [pc.allgather_pieces(n, 2) for n in (1, 65536, 65537, 1e9)] == [1, 1, 2, 64]
    # the pieces probe_link picks for the testbed's 810 kB int8 payload: 64 kB up to
    # 100 Mbit/s; at 1 Gbit/s 256 kB take 2.2 + 0.28 ms, 4 ms of that rate is 421 kB: 2
    assert [pc.allgather_pieces(810_000, 2, pc.Link(rate, 3e-5), 2.5e-4)
            for rate in (10e6, 100e6, 1e9)] == [13, 13, 2]
    assert diloco.piece_bytes(1e6) == 65536 and diloco.piece_bytes(1e8) == 400_000
    assert pc.allgather_pieces(1e9, 3) == 1  # a ring of 3+ uses each connection one way
    # int8, 2 replicas: 250 000 value bytes in 4 pieces, 62 scales (248 bytes) in 1
    link = pc.Link(bandwidth=8e6, latency=0.01, efficiency=1.0)
    st = _stage(params=250_000)
    w = pc.Workload(stages=(st,), microbatches=1, batch=1, inner_steps=1, pseudo_wire="int8")
    p = pc.predict(w, pc.Fleet(2, link))
    assert p.sync_s == pytest.approx((250_000 + 248) / 1e6 + 5 * 0.01)


def test_ddp_one_bucket_after_the_backward():
    full = pc.FullCost(fwd_s=0.1, bwd_s=0.2, step_s=0.05, buckets=((1e6, 1.0),))
    w = pc.Workload(stages=(_stage(params=250_000),), microbatches=1, batch=16, inner_steps=10,
                    full=full)
    d = pc.predict_ddp(w, pc.Fleet(4, BYTES_1MB_S))
    assert d.step_s == pytest.approx(0.1 + 0.2 + 1.5 + 0.05)
    assert d.samples_per_s == pytest.approx(4 * 16 / d.step_s)
    assert d.utilisation == pytest.approx(0.35 / d.step_s)
    assert d.gradient_bytes == pytest.approx(10 * 1.5e6)


def test_ddp_buckets_and_overlap():
    mib = 1 << 20
    # parameters in model order (bytes, backward share done when ready): reversed, the
    # first bucket closes at 1 MiB, the next at 25 MiB
    params = [(20 * mib, 1.0), (10 * mib, 0.8), (mib, 0.5), (mib // 2, 0.1)]
    assert pc.ddp_buckets(params) == ((1.5 * mib, 0.5), (30 * mib, 1.0))
    full = pc.FullCost(0.0, 10.0, 0.0, ((1e6, 0.5), (1e6, 1.0)))
    w = pc.Workload(stages=(_stage(params=1),), microbatches=1, batch=1, inner_steps=1,
                    full=full)
    # n = 2: each bucket 1 s; the first overlaps the backward, the second follows it
    assert pc.predict_ddp(w, pc.Fleet(2, BYTES_1MB_S)).step_s == pytest.approx(11.0)


def test_expected_max_of_normals():
    # n = 2: E[max(X, Y)] = E|X - Y| / 2 = 1/sqrt(pi); n = 3: 3/(2 sqrt(pi)) in closed form
    assert pc.expected_max(1) == 0.0
    assert pc.expected_max(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-6)
    assert pc.expected_max(3) == pytest.approx(1.5 / math.sqrt(math.pi), abs=1e-6)
    assert pc.expected_max(8) == pytest.approx(1.4236, abs=1e-3)  # tables of order stats


def test_stragglers_wait_for_the_slowest_replica():
    """Two replicas, 2 micro-batches, H = 8, a micro-batch's fwd+bwd+step with sd 3 ms:
    each replica's window varies with sd sqrt(8 * 2 * 9e-6) = 12 ms, and the outer step
    waits e_2 * 12 ms = 6.77 ms longer; DDP waits e_4 * its step's sd per step."""
    def outer(sd, hosts, fragments=1, overlap=0, params=250_000):
        st = _stage(fwd_s=0.01, params=params, outer_local_s=0.003, sd_s=sd)
        w = pc.Workload(stages=(st,), microbatches=2, batch=4, inner_steps=8,
                        fragments=fragments, overlap_steps=overlap)
        return pc.predict(w, pc.Fleet(hosts, BYTES_1MB_S))

    assert outer(0.003, 2).sync_s - outer(0.0, 2).sync_s == pytest.approx(
        0.012 / math.sqrt(math.pi))
    assert outer(0.003, 1).outer_s == outer(0.0, 1).outer_s  # alone: nobody to wait for
    # streaming, 2 fragments: each waits for the slowest of its 4 steps, sd sqrt(4*2*9e-6)
    assert outer(0.003, 2, 2).sync_s - outer(0.0, 2, 2).sync_s == pytest.approx(
        2 * math.sqrt(8 * 9e-6) / math.sqrt(math.pi))
    # ... unless a fragment's overlap hides it: 2 steps of 20 ms > 2 ms of 4 kB + 4.8 ms
    assert outer(0.003, 2, 2, 2, 1000).sync_s == outer(0.0, 2, 2, 2, 1000).sync_s
    full = pc.FullCost(0.1, 0.2, 0.05, buckets=((1e6, 1.0),), sd_s=0.004)
    w = pc.Workload(stages=(_stage(params=1),), microbatches=1, batch=1, inner_steps=1,
                    full=full)
    assert pc.predict_ddp(w, pc.Fleet(4, BYTES_1MB_S)).step_s == pytest.approx(
        0.1 + 0.2 + 1.5 + 0.05 + pc.expected_max(4) * 0.004)


def test_layout_is_distqats_plan():
    lay = pc.layout(pc.Fleet(8, BYTES_1MB_S), 2)
    assert len(lay.chains) == 4 and all(a != b for a, b in lay.chains) and lay.spares == 0
    lay = pc.layout(pc.Fleet(4, BYTES_1MB_S, workers_per_host=2), 2)
    assert all(a == b for a, b in lay.chains)  # whole replicas on one host
    assert pc.layout(pc.Fleet(3, BYTES_1MB_S), 2).spares == 1


# ---------------------------------------------------------------- the model itself

def test_facts_from_the_model_itself():
    from distqat.pipeline.build import build_stages
    from distqat.stage_times import model_facts, wire_bytes

    cfg = load_config(TINY)
    io = {"input_shape": [32], "num_classes": 10}
    facts = model_facts(cfg, io)
    built = build_stages(cfg, io, cuts=facts.cuts)
    for s, fact in enumerate(facts.stages):
        assert fact.params == sum(p.numel() for p in built[s].parameters())
    assert facts.microbatch == 32 and facts.stages[0].out_shape == (32, 128)
    assert facts.stages[1].out_shape == ()
    assert wire_bytes((32, 128), "fp32", 4) == 32 * 128 * 4
    assert wire_bytes((32, 128), "int8", 4) == 32 * 128 + 4 * 32  # a scale per row
    assert facts.target_bytes == 32 * 8
    assert sum(n for n, _ in facts.full_params) == facts.params


# ---------------------------------------------------------------- --profile, read back

@pytest.mark.timeout(120)
def test_profile_writes_stage_times_the_simulator_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--config", TINY, "--hosts", "2", "--bandwidth", "100mbit", "--repeats", "1"]
    assert sim.main(args + ["--profile"]) == 0
    kept = tmp_path / "runs" / "tiny" / "stage_times.json"
    data = json.loads(kept.read_text())
    assert len(data["stages"]) == 2 and data["full"]["fwd_s"] > 0
    assert all(s["fwd_s"] > 0 and s["bwd_s"] > 0 for s in data["stages"])
    # the jitter, sampled for a second: spread, and far below a second
    assert all(0 < s["sd_s"] < 0.1 for s in data["stages"] + [data["full"]])
    # a real 2-stage chain on loopback: a message costs something, and not a second
    assert 0 < data["rpc_s"] < 0.1 and 0 <= data["driver_s"] < 0.1
    assert 0 < data["collective_s"] < 0.1  # two processes' one-element all-gather
    assert "measured on this machine now" in capsys.readouterr().out
    # the simulator reads them back: make stage 0 one second per micro-batch forward
    data["stages"][0]["fwd_s"] = 1.0
    kept.write_text(json.dumps(data))
    assert sim.main(args + ["--json", "out.json"]) == 0
    out = capsys.readouterr().out
    assert f"read from {Path('runs/tiny/stage_times.json')}" in out
    row = json.loads((tmp_path / "out.json").read_text())["rows"][0]
    # tiny: 2 micro-batches, gpipe, stage 0 first: its two forwards alone take 2 s
    assert 2.0 < row["diloco"]["inner_s"] < 2.5
    # every scenario in one plot
    assert sim.main(["--config", TINY, "--hosts", "2,4,8", "--bandwidth", "10mbit,1gbit",
                     "--plot", "fleet.png"]) == 0
    assert (tmp_path / "fleet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_calibration_scales_the_stages_compute_and_the_driver_only():
    """``--calibrate``'s scale multiplies forward, backward, step and the driver's own
    work; the whole model's times (DDP), the outer step and the messages stay."""
    from distqat.stage_times import model_facts

    cfg = load_config(TINY, [])
    facts = model_facts(cfg, sim.model_io(cfg, []))
    stage = {"fwd_s": 1e-3, "bwd_s": 2e-3, "step_s": 5e-4, "sd_s": 1e-4,
             "outer": {w: {"outer_local_s": 3e-3, "decode_s": 0.0}
                       for w in ("fp32", "bf16", "int8")}}
    times = {"stages": [stage] * 2, "full": {"fwd_s": 3e-3, "bwd_s": 6e-3, "step_s": 1e-3},
             "rpc_s": 1e-4, "driver_s": 2e-4, "collective_s": 5e-4}
    plain = sim.workload(cfg, facts, times)
    scaled = sim.workload(cfg, facts, dict(times, calibration={"scale": 1.5}))
    for a, b in zip(plain.stages, scaled.stages):
        assert (b.fwd_s, b.bwd_s, b.step_s) == pytest.approx(
            (1.5 * a.fwd_s, 1.5 * a.bwd_s, 1.5 * a.step_s))
        assert (b.outer_local_s, b.sd_s, b.act_bytes) == (a.outer_local_s, a.sd_s, a.act_bytes)
    assert scaled.driver_s == pytest.approx(1.5 * plain.driver_s)
    assert (scaled.full, scaled.rpc_s, scaled.collective_s) == (
        plain.full, plain.rpc_s, plain.collective_s)


@pytest.mark.timeout(180)
def test_calibrate_scales_the_profile_to_a_real_runs_inner_step(tmp_path, monkeypatch,
                                                                 capsys):
    """A short real run of one pipeline (distqat.local) times the inner step; with one
    stage the model's step, scaled, is that step exactly; kept, it is read back."""
    from distqat.stage_times import model_facts

    monkeypatch.chdir(tmp_path)
    over = ["model_pipeline.num_stages=1", "model_pipeline.num_microbatches=1",
            "diloco.inner_steps=4"]
    args = ["--config", TINY, "--hosts", "2", "--repeats", "1", "--calibrate"] + over
    assert sim.main(args + ["--json", "out.json"]) == 0
    captured = capsys.readouterr()
    assert "calibrating" in captured.err
    kept = json.loads((tmp_path / "runs" / "tiny" / "stage_times.json").read_text())
    c = kept["calibration"]
    # at least 3 outer steps of 4, the first window not counted
    assert c["replicas"] == 1 and c["steps"] >= 8
    assert c["for"] == {"inner_steps": 4, "pseudo_grads": "fp32", "fragments": 1,
                        "replicas": 1}
    assert 0 < c["model_step_s"] < 0.1 and 0 < c["run_step_s"] < 0.1
    assert c["scale"] == pytest.approx(c["run_step_s"] / c["model_step_s"])
    assert f"compute x{c['scale']:.3g}" in captured.out
    w = json.loads((tmp_path / "out.json").read_text())["workload"]
    cfg = load_config(TINY, over)
    facts = model_facts(cfg, sim.model_io(cfg, []))
    assert pc.inner_step_s(sim.workload(cfg, facts, kept), []) == pytest.approx(
        c["run_step_s"])
    assert w["driver_s"] == pytest.approx(c["scale"] * kept["driver_s"])
    # kept with the profile: read back, not run again; another inner_steps runs again
    assert sim.main(args) == 0
    assert "calibrating" not in capsys.readouterr().err
    assert sim.main(args + ["diloco.inner_steps=3"]) == 0
    assert "calibrating" in capsys.readouterr().err


def test_jitter_makes_a_flop_derived_fleet_wait_for_its_slowest(tmp_path, capsys):
    """From FLOPs no step varies; ``--jitter 0.1`` gives every step an sd of 10 % of its
    mean: 8 replicas of one stage wait e_8 * 0.1 * (f + g + o) * sqrt(H) per outer step."""
    args = ["--config", TINY, "--hosts", "8", "--device", "h100", "--bandwidth", "1gbit",
            "model_pipeline.num_stages=1", "model_pipeline.num_microbatches=1"]
    rows = {}
    for extra in ([], ["--jitter", "0.1"]):
        out = tmp_path / f"{len(extra)}.json"
        assert sim.main(args + extra + ["--json", str(out)]) == 0
        rows[len(extra)] = json.loads(out.read_text())
    assert "varying by 10 %" in capsys.readouterr().out
    st = rows[2]["workload"]["stages"][0]
    step = st["fwd_s"] + st["bwd_s"] + st["step_s"]
    assert rows[0]["workload"]["stages"][0]["sd_s"] == 0.0
    assert st["sd_s"] == pytest.approx(0.1 * step)
    H = rows[2]["workload"]["inner_steps"]
    wait = rows[2]["rows"][0]["diloco"]["outer_s"] - rows[0]["rows"][0]["diloco"]["outer_s"]
    assert wait == pytest.approx(pc.expected_max(8) * 0.1 * step * math.sqrt(H))


# ---------------------------------------------------------------- the command line

@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,flag", [
    (["--bandwidth", "100mbps"], "--bandwidth"),
    (["--hosts", "0"], "--hosts"),
    (["--latency", "5parsecs"], "--latency"),
    (["--jitter", "-0.1"], "--jitter"),
    (["--config", "configs/nope.yaml"], "--config"),
    (["--calibrate", "--device", "h100"], "--calibrate"),
    (["--calibrate", "data.name=image", "data.dataset=uoft-cs/cifar10", "data.path=missing",
      "data.args={image_column: img, label_column: label}", "model_pipeline.model=cnn"],
     "--calibrate"),  # its run needs the data: checked before profiling
])
def test_bad_input_exits_2_naming_the_flag(args, flag, tmp_path):
    done = subprocess.run([sys.executable, "-m", "distqat.simulate", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distqat.simulate: {flag}: "), lines


def test_quantities_parse():
    assert sim.parse_bandwidth("10mbit,1gbit") == [10e6, 1e9]
    assert sim.parse_latency("50ms,0s") == [0.05, 0.0]
    assert sim.parse_hosts("4,16") == [4, 16]


# ---------------------------------------------------------------- a throttled run

def _bench():
    spec = importlib.util.spec_from_file_location("simulate_check",
                                                  ROOT / "bench" / "simulate_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(150)
@pytest.mark.xdist_group("timed")  # it times a run: with the other timed tests, in turn
def test_two_namespace_run_at_100mbit_lands_within_25_percent(tmp_path):
    """DiLoCo, one stage per replica, one replica per namespace host, a 1024-wide MLP
    (12.9 MB fp32) averaged every 2 inner steps over a 100 Mbit/s tbf link."""
    bench = _bench()
    why = bench.unavailable()
    if why:
        pytest.skip(f"no throttled namespaces here: {why}")
    over = bench.COMMON + ["model_pipeline.model_args.hidden=1024", "diloco.inner_steps=2",
                           "quant.wire.pseudo_grads=fp32", "model_pipeline.num_stages=1",
                           "model_pipeline.num_microbatches=1", "diloco.outer_steps=8"]
    (tmp_path / "profiles").mkdir()
    pred = bench.prediction(over, 2, 100e6, 0.0, tmp_path / "profiles", repeats=3)
    with bench.Testbed(2, tmp_path / "bed") as bed:
        bed.throttle(100e6)
        summary = bench.run_distqat(bed, over, timeout=110)
    measured = statistics.median(r["train_seconds"] / r["outer_steps_done"]
                                 for r in summary["replicas"])
    predicted = pred["diloco"]["outer_s"]
    assert abs(predicted - measured) / measured <= 0.25, (predicted, measured)
    assert not list(Path("/var/run/netns").glob(bed.bridge[:-2] + "*"))  # cleaned up


def test_repredict_recomputes_a_saved_check_with_its_own_times():
    """A saved 3-host pipeline run at 10 Mbit/s, predicted again: with one connection per
    pair (the default) the hops overlap across micro-batches, with ``--set
    comm.rpc_channels=multiplexed`` they share each link and overlap nothing."""
    bench = _bench()
    stage = {"fwd_s": 1e-3, "bwd_s": 2e-3, "step_s": 5e-4,
             "outer": {w: {"outer_local_s": 1e-3, "decode_s": 0.0}
                       for w in ("fp32", "bf16", "int8")}}
    times = {"stages": [stage] * 3, "full": {"fwd_s": 3e-3, "bwd_s": 6e-3, "step_s": 1e-3}}
    run = {"hosts": 3, "rate": 10e6, "setup": "pipe", "repeat": 0,
           "predicted": {"times": times}, "measured": {}}

    def inner_s(chosen):
        saved = {"command": "python bench/simulate_check.py", "set": chosen,
                 "links": {"3/1e+07": {"rtt_ms": 0.1}}, "runs": [dict(run)]}
        return bench.repredict(saved)["runs"][0]["predicted"]["diloco"]["inner_s"]

    single, multiplexed = inner_s([]), inner_s(["comm.rpc_channels=multiplexed"])
    # each hop carries 128 x 512 fp32 (256 kB) plus the targets: ~0.22 s at 10 Mbit/s;
    # sharing costs one such transfer forward and one back
    assert 0.35 < multiplexed - single < 0.5, (single, multiplexed)
    assert 1.25 < multiplexed / single < 1.4


def test_a_check_profiles_as_many_at_once_as_compute_at_once():
    bench = _bench()
    at_once = {(name, n): bench.computing_at_once(
        load_config(bench.CONFIG, bench.setup_overrides(name, n)), n)
        for name in ("int8-h5", "ddp", "pipe") for n in (2, 3)}
    # every DiLoCo replica and DDP rank computes at once; of a pipeline's 3 stages only as
    # many as it has micro-batches (2)
    assert at_once == {("int8-h5", 2): 2, ("int8-h5", 3): 3, ("ddp", 2): 2, ("ddp", 3): 3,
                       ("pipe", 2): 2, ("pipe", 3): 2}


def test_step_spread_from_a_runs_every_step():
    """H = 2, the first window skipped; then replica 0 takes windows of 2 and 4 s,
    replica 1 of 4 and 2 s: the mean waits 1 s for the slowest every outer step."""
    bench = _bench()
    secs = {"replica0": [9, 9, 1, 1, 1, 3], "replica1": [9, 9, 2, 2, 1, 1]}
    scalars = {k: {"train/batch_size": [1.0] * 6, "train/samples_per_s": [1 / t for t in v]}
               for k, v in secs.items()}
    got = bench.step_spread(scalars, ["diloco.inner_steps=5", "diloco.inner_steps=2"])
    assert got["straggle_s"] == pytest.approx(1.0)
    assert got["step_sd_s"] == pytest.approx(statistics.median(
        [statistics.stdev([1, 1, 1, 3]), statistics.stdev([2, 2, 1, 1])]))
    # replica 0: mean 1.5, median 1; replica 1: mean 1.5, median 1.5
    assert got["step_mean_s"] == pytest.approx(1.5)
    assert got["step_median_s"] == pytest.approx(1.25)
    # the check's own runs log every 1000th step: nothing to say
    assert bench.step_spread({k: {"train/batch_size": [1.0], "train/samples_per_s": [1.0]}
                              for k in secs}, ["diloco.inner_steps=2"]) == {}


@pytest.mark.timeout(120)
def test_profile_concurrency_prints_each_profiles_prediction(capsys):
    bench = _bench()
    assert bench.main(["--profile-concurrency", "1", "2", "--hosts", "2", "--setups", "pipe",
                       "--rates", "100mbit", "--repeats", "1", "--profile-repeats", "2"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("2 hosts, pipe")]
    assert [l.split("profiled by ")[1][:1] for l in lines] == ["1", "2"]
    # a 2-stage pipeline at 100 Mbit/s: two 256 kB hops each way, ~90 ms an inner step
    assert all(50 < float(l.split("inner step ")[1].split(" ms")[0]) < 500 for l in lines)
