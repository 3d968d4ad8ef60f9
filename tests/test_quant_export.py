"""Integer export: exact round trip to the fake-quantized model, file sizes, corruption."""

import itertools

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distqat.quant import (QATSpec, export_state, fake_quantize, load_export, load_into, pack_int,
                           prepare_qat, qrange, read_export, save_export, unpack_int)
from nets import small_mlp as _mlp


def _trained_qat(spec, width=32, seed=0, steps=3):
    m = prepare_qat(_mlp(width, seed=seed), spec)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        m(torch.randn(16, width, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return m.eval()


@pytest.mark.parametrize("bits,signed", list(itertools.product(range(2, 9), (True, False))))
def test_pack_unpack_round_trip(bits, signed):
    qmin, qmax = qrange(bits, signed)
    for shape in [(7,), (3, 5), (4, 4)]:
        q = torch.randint(qmin, qmax + 1, shape, dtype=torch.int32)
        stored = pack_int(q, bits, signed)
        assert torch.equal(unpack_int(stored, bits, signed, shape), q)
        n = q.numel()
        assert stored.numel() == ((n + 1) // 2 if bits <= 4 else n) and stored.element_size() == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("per_channel,symmetric", [(True, True), (False, True), (True, False)])
def test_dequantized_weights_equal_fake_quantized(tmp_path, bits, per_channel, symmetric):
    m = _trained_qat(QATSpec(weight_bits=bits, per_channel=per_channel, weight_symmetric=symmetric))
    path = tmp_path / "m.safetensors"
    save_export(path, m)
    state = load_export(path)
    for i in (0, 2, 4):
        fq = m[i].weight_fq
        expected = fake_quantize(m[i].weight, *fq.qparams(), fq.qmin, fq.qmax, axis=0 if per_channel else None)
        assert torch.equal(state[f"{i}.weight"], expected)
        assert torch.equal(state[f"{i}.bias"], m[i].bias)
    assert set(state) == set(_mlp(32).state_dict())


@pytest.mark.parametrize("method", ["minmax", "lsq"])
def test_round_trip_outputs_equal_fake_quant_outputs(tmp_path, method):
    spec = QATSpec(weight_bits=4, activation_bits=8, method=method)
    m = _trained_qat(spec)
    x = torch.randn(8, 32)
    with torch.no_grad():
        expected = m(x)
    path = tmp_path / "m.safetensors"
    save_export(path, m)
    # evaluation path 1: a fresh QAT-prepared model gets weights and all quantizer scales
    fresh = load_into(prepare_qat(_mlp(32, seed=99), spec).eval(), path)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    # evaluation path 2: a plain float model (weights only) equals a weight-only QAT model
    w_only = _trained_qat(QATSpec(weight_bits=4, method=method))
    save_export(path, w_only)
    plain = _mlp(32, seed=99)
    plain.load_state_dict(load_export(path))
    with torch.no_grad():
        assert torch.equal(plain(x), w_only(x))


def test_gpt2_style_conv1d_round_trip(tmp_path):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    m = nn.Sequential(Conv1D(24, 8), nn.GELU(), Conv1D(8, 24))
    prepare_qat(m, QATSpec(weight_bits=4, activation_bits=8))
    x = torch.randn(2, 5, 8)
    m(x)
    m.eval()
    with torch.no_grad():
        expected = m(x)
    save_export(tmp_path / "c.safetensors", m)
    fresh = nn.Sequential(Conv1D(24, 8), nn.GELU(), Conv1D(8, 24))
    prepare_qat(fresh, QATSpec(weight_bits=4, activation_bits=8)).eval()
    load_into(fresh, tmp_path / "c.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    tensors, meta = read_export(tmp_path / "c.safetensors")
    assert tensors["0.weight_fq.scale"].shape == (24,)  # per output feature: axis 1 of (in, out)


@pytest.mark.parametrize("bits,limit", [(8, 0.30), (4, 0.17)])
def test_file_size_ratio(tmp_path, bits, limit):
    float_model = _mlp(256)
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, tmp_path / "fp32.safetensors")
    m = prepare_qat(_mlp(256), QATSpec(weight_bits=bits))
    m(torch.randn(4, 256))
    save_export(tmp_path / "q.safetensors", m)
    ratio = (tmp_path / "q.safetensors").stat().st_size / (tmp_path / "fp32.safetensors").stat().st_size
    assert ratio <= limit, ratio


def test_export_before_observing_raises():
    m = prepare_qat(_mlp(8), QATSpec(weight_bits=4))
    with pytest.raises(ValueError, match="'0'"):
        export_state(m)


def test_metadata_namespace_and_extra_metadata(tmp_path):
    m = _trained_qat(QATSpec(weight_bits=8))
    save_export(tmp_path / "m.safetensors", m, metadata={"step": "12"})
    _, meta = read_export(tmp_path / "m.safetensors")
    assert meta["step"] == "12" and meta["distqat.format"] == "distqat-qat/1"
    with pytest.raises(ValueError, match="metadata"):
        export_state(m, metadata={"distqat.sha256": "x"})


def test_truncated_file_raises_naming_it(tmp_path):
    m = _trained_qat(QATSpec(weight_bits=4, activation_bits=8))
    good = tmp_path / "good.safetensors"
    save_export(good, m)
    data = good.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    for n in (0, 5, 8, 100, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match="truncated.safetensors"):
            load_export(bad)
    with pytest.raises(ValueError, match="missing.safetensors"):
        load_export(tmp_path / "missing.safetensors")


def test_every_single_flipped_byte_is_detected(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    prepare_qat(m, QATSpec(weight_bits=4, activation_bits=8))
    m(torch.randn(4, 6))
    good = tmp_path / "good.safetensors"
    save_export(good, m)
    data = good.read_bytes()
    bad = tmp_path / "flipped.safetensors"
    for i in range(len(data)):  # header and payload alike (~1.4 kB)
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="flipped.safetensors"):
            read_export(bad)
    read_export(good)


def test_load_into_a_different_model_raises(tmp_path):
    m = _trained_qat(QATSpec(weight_bits=8))
    save_export(tmp_path / "m.safetensors", m)
    with pytest.raises(ValueError, match="does not match"):
        load_into(_mlp(32, depth=2), tmp_path / "m.safetensors")
