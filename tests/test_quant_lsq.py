"""LSQ: gradients equal torch's learnable fake-quant kernels, and the step learns the
MSE-optimal value."""

import pytest
import torch

from distqat.quant import FakeQuantizer, fake_quantize, lsq_grad_factor, lsq_quantize, qrange


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (8, True), (4, False), (8, False)])
def test_lsq_gradients_match_torch_learnable(bits, signed):
    qmin, qmax = qrange(bits, signed)
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(12, 30, generator=gen) * 2).requires_grad_()
    dy = torch.randn(12, 30, generator=gen)
    # per tensor; zero points >= 0 only: torch's per-tensor backward takes the zero point as
    # int(zp + 0.5), which truncates negative ones toward zero (-3 -> -2) unlike its forward.
    zp = torch.tensor([float(max(qmin, 0) + 1)])
    s_ref = torch.tensor([0.2], requires_grad=True)
    g = lsq_grad_factor(x, qmax)
    ref = torch._fake_quantize_learnable_per_tensor_affine(x, s_ref, zp, qmin, qmax, g)
    s = s_ref.detach().clone().requires_grad_()
    ours = lsq_quantize(x, s, zp, qmin, qmax)
    assert torch.equal(ours, ref)
    gx_ref, gs_ref = torch.autograd.grad(ref, [x, s_ref], dy)
    gx, gs = torch.autograd.grad(ours, [x, s], dy)
    assert torch.equal(gx, gx_ref)
    assert torch.allclose(gs, gs_ref, rtol=1e-5, atol=1e-6)  # sums in a different order
    # per channel along both axes, any zero point
    for axis in (0, 1):
        n = x.shape[axis]
        s_ref = (torch.rand(n, generator=gen) * 0.3 + 0.05).requires_grad_()
        zp = torch.randint(qmin, qmax + 1, (n,), generator=gen).float()
        g = lsq_grad_factor(x, qmax, axis)
        assert g == pytest.approx(1 / (x.numel() / n * qmax) ** 0.5)
        ref = torch._fake_quantize_learnable_per_channel_affine(x, s_ref, zp, axis, qmin, qmax, g)
        s = s_ref.detach().clone().requires_grad_()
        ours = lsq_quantize(x, s, zp, qmin, qmax, axis=axis)
        assert torch.equal(ours, ref)
        gx_ref, gs_ref = torch.autograd.grad(ref, [x, s_ref], dy)
        gx, gs = torch.autograd.grad(ours, [x, s], dy)
        assert torch.equal(gx, gx_ref)
        assert torch.allclose(gs, gs_ref, rtol=1e-5, atol=1e-6)


def test_lsq_init_follows_the_paper():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    fq = FakeQuantizer(4, method="lsq")
    fq(x)
    assert fq.scale.item() == pytest.approx(2 * x.abs().mean().item() / 7 ** 0.5, rel=1e-6)
    assert isinstance(fq.scale, torch.nn.Parameter)


def test_lsq_learns_mse_optimal_step():
    torch.manual_seed(0)
    x = torch.randn(10_000)
    qmin, qmax = qrange(4, True)
    grid = torch.linspace(0.05, 1.0, 400)
    mse = torch.stack([((fake_quantize(x, s, 0, qmin, qmax) - x) ** 2).mean() for s in grid])
    best = grid[mse.argmin()].item()

    fq = FakeQuantizer(4, signed=True, symmetric=True, method="lsq")
    fq(x)  # first training forward initialises the step from the data
    start = fq.scale.item()
    opt = torch.optim.Adam([fq.scale], lr=0.01)
    for _ in range(300):
        loss = ((fq(x) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned = fq.scale.item()
    assert abs(start - best) / best > 0.3  # it had somewhere to go
    assert abs(learned - best) / best < 0.10, (learned, best)


def test_lsq_freeze_after_stops_learning():
    x = torch.randn(500, requires_grad=True)
    fq = FakeQuantizer(4, method="lsq", freeze_after=1)
    fq(x).sum().backward()
    assert fq.scale.grad is not None
    fq.scale.grad = None
    fq(x).sum().backward()
    assert fq.scale.grad is None and x.grad is not None
