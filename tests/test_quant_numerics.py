"""Our fake quantization against torch's: forward bit for bit, STE gradients equal; qparams
against torch.ao's observers; the FakeQuantizer's observer behaviour."""

import itertools

import pytest
import torch
from torch.ao.quantization.observer import (MinMaxObserver, MovingAverageMinMaxObserver,
                                            MovingAveragePerChannelMinMaxObserver)

from distqat.quant import FakeQuantizer, calculate_qparams, dequantize, fake_quantize, qrange, quantize

BITS = range(2, 9)
SHAPES = [(7,), (5, 11), (3, 4, 9), (2, 3, 4, 5)]


def _grad(out, x, dy):
    (g,) = torch.autograd.grad(out, x, dy)
    return g


def _rand_qparams(gen, n, qmin, qmax, symmetric, signed):
    scale = torch.rand(n, generator=gen) * 0.5 + 1e-3
    if symmetric:
        zp = torch.full((n,), 0 if signed else (qmin + qmax + 1) // 2, dtype=torch.int32)
    else:
        zp = torch.randint(qmin, qmax + 1, (n,), generator=gen, dtype=torch.int32)
    return scale, zp


def test_qrange():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-8, 7)
    assert qrange(2, False) == (0, 3)
    for bad in (1, 9, 8.0, True):
        with pytest.raises(ValueError, match="bits"):
            qrange(bad, True)


@pytest.mark.parametrize("bits,signed,symmetric",
                         list(itertools.product(BITS, (True, False), (True, False))))
def test_matches_torch_per_tensor_and_per_channel(bits, signed, symmetric):
    qmin, qmax = qrange(bits, signed)
    gen = torch.Generator().manual_seed(1000 * bits + 10 * signed + symmetric)
    for shape in SHAPES:
        x = (torch.randn(shape, generator=gen) * 3).requires_grad_()
        dy = torch.randn(shape, generator=gen)
        # per tensor
        scale, zp = _rand_qparams(gen, 1, qmin, qmax, symmetric, signed)
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        ours = fake_quantize(x, scale, zp, qmin, qmax)
        assert torch.equal(ours, ref)
        assert torch.equal(_grad(ours, x, dy), _grad(ref, x, dy))
        # the python-number overload too
        ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
        assert torch.equal(fake_quantize(x, float(scale), int(zp), qmin, qmax), ref)
        # per channel, every axis (negative too)
        for axis in list(range(x.dim())) + [-1]:
            n = x.shape[axis]
            scale, zp = _rand_qparams(gen, n, qmin, qmax, symmetric, signed)
            ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)
            ours = fake_quantize(x, scale, zp, qmin, qmax, axis=axis)
            assert torch.equal(ours, ref), (shape, axis)
            assert torch.equal(_grad(ours, x, dy), _grad(ref, x, dy)), (shape, axis)


def test_rounding_ties_multiply_by_reciprocal_like_torch():
    """Inputs on the half-steps, where x*(1/s) and x/s round differently: we follow torch."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(200, generator=gen) * 0.3 + 1e-3
    k = torch.randint(-130, 130, (200, 64), generator=gen).float()
    x = (k + 0.5) * scale[:, None]
    zp = torch.zeros(200, dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, -128, 127)
    assert torch.equal(fake_quantize(x, scale, zp, -128, 127, axis=0), ref)
    by_division = torch.clamp(torch.round(x / scale[:, None]), -128, 127) * scale[:, None]
    assert not torch.equal(by_division, ref)  # the test can tell the two apart
    # half-to-even at exact ties
    exact = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5])
    assert fake_quantize(exact, 1.0, 0, -8, 7).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_torch(dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 33, generator=gen) * 2).to(dtype)
    scale = torch.rand(16, generator=gen) * 0.1 + 1e-2
    zp = torch.randint(-3, 4, (16,), generator=gen, dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, -8, 7)
    ours = fake_quantize(x, scale, zp, -8, 7, axis=0)
    assert ours.dtype == dtype and torch.equal(ours, ref)
    ref = torch.fake_quantize_per_tensor_affine(x, 0.0371, 2, -128, 127)
    assert torch.equal(fake_quantize(x, 0.0371, 2, -128, 127), ref)


def test_quantize_dequantize_is_fake_quantize():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 20, generator=gen)
    scale, zp = torch.rand(20, generator=gen) * 0.2 + 0.01, torch.randint(-8, 8, (20,), dtype=torch.int32)
    q = quantize(x, scale, zp, -8, 7, axis=1)
    assert q.dtype == torch.int32 and q.min() >= -8 and q.max() <= 7
    assert torch.equal(dequantize(q, scale, zp, axis=1), fake_quantize(x, scale, zp, -8, 7, axis=1))


def test_zero_point_rounded_and_clamped():
    x = torch.linspace(-3, 3, 101)
    assert torch.equal(fake_quantize(x, 0.1, torch.tensor(2.4), -8, 7), fake_quantize(x, 0.1, 2, -8, 7))
    assert torch.equal(fake_quantize(x, 0.1, 50, -8, 7), fake_quantize(x, 0.1, 7, -8, 7))


def test_wrong_qparam_count_raises():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="per-channel"):
        fake_quantize(x, torch.ones(4), torch.zeros(4, dtype=torch.int32), -8, 7, axis=1)
    with pytest.raises(ValueError, match="per-tensor"):
        fake_quantize(x, torch.ones(4), torch.zeros(4, dtype=torch.int32), -8, 7)


# --------------------------------------------------------------------------- qparams

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", ["symmetric", "affine"])
def test_qparams_match_minmax_observer(bits, scheme):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(1000, generator=gen) * 2 + 0.7
    symmetric = scheme == "symmetric"
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    cases = [(True, torch.qint8)] + ([] if symmetric and bits != 8 else [(False, torch.quint8)])
    for signed, dtype in cases:
        qmin, qmax = qrange(bits, signed)
        if bits == 8:
            obs = MinMaxObserver(dtype=dtype, qscheme=qscheme)
        else:
            obs = MinMaxObserver(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
        obs(x)
        ref_scale, ref_zp = obs.calculate_qparams()
        scale, zp = calculate_qparams(x.min(), x.max(), qmin, qmax, symmetric=symmetric)
        assert torch.equal(scale.reshape(-1), ref_scale.reshape(-1))
        assert torch.equal(zp.reshape(-1), ref_zp.reshape(-1).to(torch.int32))


def test_qparams_all_zero_tensor_uses_eps():
    scale, zp = calculate_qparams(torch.tensor(0.0), torch.tensor(0.0), -8, 7, symmetric=False)
    assert scale.item() == torch.finfo(torch.float32).eps and zp.item() == -8 + 0
    assert torch.equal(fake_quantize(torch.zeros(5), scale, zp, -8, 7), torch.zeros(5))


# --------------------------------------------------------------------------- observer

def test_ema_observer_matches_torch_moving_average():
    gen = torch.Generator().manual_seed(5)
    fq = FakeQuantizer(8, signed=False, symmetric=False, averaging_constant=0.1)
    obs = MovingAverageMinMaxObserver(averaging_constant=0.1, dtype=torch.quint8)
    for i in range(6):
        x = torch.randn(64, 8, generator=gen) * (1 + i)
        y = fq(x)
        obs(x)
        assert torch.allclose(fq.min_val, obs.min_val.reshape(1)) and torch.allclose(fq.max_val, obs.max_val.reshape(1))
        ref_scale, ref_zp = obs.calculate_qparams()
        assert torch.allclose(fq.scale, ref_scale, rtol=1e-6) and torch.equal(fq.zero_point, ref_zp.to(torch.int32))
        assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, fq.scale, fq.zero_point, 0, 255))


def test_first_observation_taken_as_is_then_ema():
    fq = FakeQuantizer(8, averaging_constant=0.5)
    fq(torch.tensor([-1.0, 2.0]))
    assert fq.min_val.item() == -1.0 and fq.max_val.item() == 2.0
    fq(torch.tensor([-3.0, 4.0]))
    assert fq.min_val.item() == -2.0 and fq.max_val.item() == 3.0


def test_per_channel_observer_matches_torch():
    gen = torch.Generator().manual_seed(6)
    fq = FakeQuantizer(8, per_channel=True, ch_axis=1, averaging_constant=0.3)
    obs = MovingAveragePerChannelMinMaxObserver(averaging_constant=0.3, ch_axis=1, dtype=torch.qint8,
                                                qscheme=torch.per_channel_symmetric)
    for _ in range(3):
        x = torch.randn(4, 6, 5, generator=gen)
        y = fq(x)
        obs(x)
        ref_scale, ref_zp = obs.calculate_qparams()
        assert torch.allclose(fq.scale, ref_scale, rtol=1e-6) and torch.equal(fq.zero_point, ref_zp.to(torch.int32))
        assert torch.equal(y, torch.fake_quantize_per_channel_affine(x, fq.scale, fq.zero_point, 1, -128, 127))


def test_freeze_after_and_eval_do_not_update():
    fq = FakeQuantizer(8, averaging_constant=1.0, freeze_after=2)
    fq(torch.tensor([-1.0, 1.0]))
    fq(torch.tensor([-2.0, 2.0]))
    frozen = fq.scale.clone()
    fq(torch.tensor([-9.0, 9.0]))  # third training forward: frozen
    assert torch.equal(fq.scale, frozen) and fq.max_val.item() == 2.0 and int(fq.steps) == 3
    fq2 = FakeQuantizer(8, averaging_constant=1.0)
    fq2(torch.tensor([-1.0, 1.0]))
    fq2.eval()
    before = {k: v.clone() for k, v in fq2.state_dict().items()}
    fq2(torch.tensor([-9.0, 9.0]))
    assert all(torch.equal(before[k], v) for k, v in fq2.state_dict().items())


def test_uninitialized_eval_passes_through_and_disabled_is_identity():
    x = torch.randn(10)
    fq = FakeQuantizer(4).eval()
    assert fq(x) is x and not fq.initialized
    off = FakeQuantizer(4, enabled=False)
    assert off(x) is x and not off.initialized


def test_state_dict_round_trip_lazy_per_channel():
    gen = torch.Generator().manual_seed(7)
    src = FakeQuantizer(4, per_channel=True, ch_axis=0, symmetric=False)
    x = torch.randn(6, 10, generator=gen)
    src(x)
    dst = FakeQuantizer(4, per_channel=True, ch_axis=0, symmetric=False)  # buffers not sized yet
    dst.load_state_dict(src.state_dict())
    assert dst.initialized and int(dst.steps) == 1
    dst.eval()
    src.eval()
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("kwargs,name", [
    (dict(bits=9), "bits"), (dict(bits=1), "bits"), (dict(method="ema"), "method"),
    (dict(averaging_constant=0.0), "averaging_constant"), (dict(freeze_after=0), "freeze_after"),
    (dict(num_channels=0, per_channel=True), "num_channels"), (dict(lsq_init="x"), "lsq_init"),
    (dict(ch_axis=1.5), "ch_axis"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FakeQuantizer(**kwargs)


@pytest.mark.parametrize("symmetric,signed", [(True, True), (False, True), (False, False), (True, False)])
def test_set_qparams_then_keep_observing(symmetric, signed):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(100, generator=gen) + 0.3
    src = FakeQuantizer(6, signed=signed, symmetric=symmetric)
    src(x)
    dst = FakeQuantizer(6, signed=signed, symmetric=symmetric, averaging_constant=0.5)
    dst.set_qparams(*src.qparams())
    assert dst.initialized
    dst.eval()
    src.eval()
    assert torch.equal(dst(x), src(x))
    dst.train()
    dst(x)  # averages into the installed range, not into +-inf
    assert torch.isfinite(dst.min_val).all() and torch.allclose(dst.scale, src.scale, rtol=1e-5)
