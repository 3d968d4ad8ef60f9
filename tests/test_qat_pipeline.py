"""QAT through the real pipeline: accuracy against fp32, the quantized wire, export."""

import subprocess
import sys

import pytest
import torch

from distqat.pipeline.build import build_full, build_stages
from distqat.config import load_config
from distqat.data import make_task
from distqat.export import load, trained_model
from distqat.quant import is_qat_layer, quantizers

from conftest import ROOT

FP32 = ("--nproc", "4")
W8A8 = ("--nproc", "4", "quant.enable=true")
W8A8_INT8_WIRE = ("--nproc", "4", "quant.enable=true", "quant.wire.activations=int8",
                  "quant.wire.pseudo_grads=int8")


@pytest.mark.timeout(400)
def test_w8a8_ends_within_5_percent_of_fp32(runs):
    fp32, qat = runs.summary(*FP32), runs.summary(*W8A8)
    assert abs(qat["loss_last"] - fp32["loss_last"]) <= 0.05 * fp32["loss_last"], (qat, fp32)
    assert qat["eval_last"]["accuracy"] > qat["eval_first"]["accuracy"] + 0.3


@pytest.mark.timeout(400)
def test_int8_wire_still_trains_and_sends_a_quarter_of_the_bytes(runs):
    base, small = runs.summary(*W8A8), runs.summary(*W8A8_INT8_WIRE)
    assert small["loss_last"] < 0.5 * small["loss_first"]
    assert abs(small["loss_last"] - base["loss_last"]) <= 0.1 * base["loss_last"]
    for key in ("activation_bytes", "gradient_bytes", "bytes_allreduced"):
        ratio = small[key] / base[key]
        # int8 plus one float32 scale per row (activations) or per 4096 elements
        assert 0.24 < ratio < 0.30, (key, ratio)


def test_quant_disabled_builds_the_plain_model_bit_for_bit():
    io = make_task(load_config().data).model_io()
    plain = build_full(load_config(), io)
    disabled = build_full(load_config(None, ["quant.enable=false", "quant.weight_bits=4"]), io)
    assert not any(is_qat_layer(m) for m in disabled.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in disabled.modules()]
    for (k, a), (k2, b) in zip(plain.state_dict().items(), disabled.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_per_stage_overrides_and_skip():
    cfg = load_config(None, ["quant.enable=true", "quant.stages.1.weight_bits=4",
                             "quant.stages.1.activation_bits=6", "quant.skip=[last]"])
    stages = build_stages(cfg, make_task(cfg.data).model_io())
    stage0 = {n: q.bits for n, q in quantizers(stages[0]).items()}
    stage1 = {n: q.bits for n, q in quantizers(stages[1]).items()}
    assert stage0 and set(stage0.values()) == {8}
    assert stage1 and {b for n, b in stage1.items() if "weight" in n} == {4}
    assert {b for n, b in stage1.items() if "act" in n} == {6}
    last = [m for m in stages[1].modules() if isinstance(m, torch.nn.Linear)][-1]
    assert not is_qat_layer(last)
    # a stage built alone is quantized as the same blocks of the whole model
    alone = build_stages(cfg, make_task(cfg.data).model_io(), [1])[1]
    assert list(quantizers(alone)) == list(quantizers(stages[1]))


@pytest.mark.timeout(400)
def test_export_round_trip_equals_fake_quant_model(runs, tmp_path):
    runs.summary(*W8A8)
    run_dir = runs.get(*W8A8)[2].cwd / "runs" / "tiny"
    path = tmp_path / "model.safetensors"
    done = subprocess.run([sys.executable, "-m", "distqat.export", str(run_dir), str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cfg, _, model = trained_model(run_dir)
    for fq in quantizers(model).values():  # calibrated and trained
        assert fq.initialized
    x, _ = make_task(cfg.data).eval_set()
    with torch.no_grad():
        want = model.eval()(x)
        got = load(path)(x)
    # same arithmetic ((q - zp) * scale, then the float op): exactly equal
    assert torch.equal(got, want)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert path.stat().st_size < 0.35 * fp32_bytes  # small model: the header weighs


def test_export_errors_name_the_file(tmp_path):
    def export(*args):
        return subprocess.run([sys.executable, "-m", "distqat.export", *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    done = export(tmp_path / "nothing", tmp_path / "out.safetensors")
    assert done.returncode == 2 and "nothing" in done.stderr and "Traceback" not in done.stderr
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="damaged.safetensors"):
        load(damaged)
