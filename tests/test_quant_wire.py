"""Wire compression: error bounds, byte counts, shapes and dtypes."""

import pickle

import pytest
import torch

from distqat.quant import decode, encode, nbytes, roundtrip

# |x - q*scale| <= scale/2 exactly in real numbers; x/scale and q*scale each round once in
# float32, so allow a few ulps of the values involved.
ULP_SLACK = 1e-6


def _rows_bound(x, payload):
    scale = payload.scale[:, None]
    err = (x.reshape(scale.shape[0], -1) - decode(payload).reshape(scale.shape[0], -1)).abs()
    return err, scale / 2 + ULP_SLACK * x.abs().max()


@pytest.mark.parametrize("shape", [(64, 1024), (8, 16, 32), (3, 1), (100,)])
def test_int8_per_row_error_bound_and_bytes(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    p = encode(x, "int8")
    assert p.data.dtype == torch.int8
    assert p.scale.numel() == (shape[0] if len(shape) > 1 else 1)
    err, bound = _rows_bound(x, p)
    assert (err <= bound).all()
    y = decode(p)
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel() >= 4096:
        assert nbytes(p) == x.numel() + 4 * p.scale.numel()
        assert 0.25 <= nbytes(p) / nbytes(encode(x, "fp32")) <= 0.26


@pytest.mark.parametrize("n,chunk", [(10_000, 4096), (4096, 4096), (5, 4096), (1000, 7)])
def test_int8_per_chunk_error_bound_and_bytes(n, chunk):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=gen) * torch.linspace(1e-3, 10, n)
    p = encode(x, "int8", chunk_size=chunk)
    nchunks = -(-n // chunk)
    assert p.scale.numel() == nchunks and p.data.numel() == n
    y = decode(p)
    assert y.shape == x.shape
    scale = p.scale.repeat_interleave(chunk)[:n]
    assert ((x - y).abs() <= scale / 2 + ULP_SLACK * x.abs().max()).all()
    assert nbytes(p) == n + 4 * nchunks
    if n >= 4096:
        assert nbytes(p) / (4 * n) <= 0.251


def test_per_chunk_isolates_outliers():
    x = torch.randn(8192)
    x[0] = 1e4  # one outlier: per chunk it only coarsens its own chunk
    whole = (x - roundtrip(x, "int8", chunk_size=8192)).abs()[4096:].max()
    chunked = (x - roundtrip(x, "int8", chunk_size=4096)).abs()[4096:].max()
    assert chunked < whole / 100


def test_zero_rows_and_exact_values():
    x = torch.zeros(4, 10)
    x[1] = torch.arange(10.0) - 5
    y = roundtrip(x, "int8")
    assert torch.equal(y[0], torch.zeros(10)) and y[1].abs().max() == 5


def test_fp32_and_bf16():
    x = torch.randn(32, 33)
    assert torch.equal(roundtrip(x, "fp32"), x)
    p = encode(x, "bf16")
    assert nbytes(p) == 2 * x.numel()
    y = decode(p)
    assert y.dtype == torch.float32 and ((x - y).abs() <= x.abs() * 2 ** -8).all()
    xb = x.to(torch.bfloat16)
    assert torch.equal(roundtrip(xb, "bf16"), xb) and roundtrip(xb, "int8").dtype == torch.bfloat16


def test_deterministic_and_picklable():
    x = torch.randn(16, 64)
    a, b = encode(x, "int8"), encode(x, "int8")
    assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
    c = pickle.loads(pickle.dumps(a))
    assert torch.equal(decode(c), decode(a))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="fmt"):
        encode(torch.randn(3), "int4")
    with pytest.raises(ValueError, match="chunk_size"):
        encode(torch.randn(3), "int8", chunk_size=0)
    with pytest.raises(ValueError, match="floating"):
        encode(torch.arange(3), "int8")
