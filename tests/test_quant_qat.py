"""prepare_qat: which layers, what their outputs look like, GPT-2's Conv1D, training, strip."""

import pytest
import torch
from torch import nn

from distqat.quant import (FakeQuantizer, QATConv1d, QATConv2d, QATLinear, QATSpec, fake_quantize,
                           prepare_qat, qat_layers, qat_param_groups, skip_first_last, strip_qat)
from nets import small_mlp as _mlp


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv1d(4, 4, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, img, tokens):
        h = self.conv2(img).mean(dim=(2, 3))              # (B, 4)
        h = self.conv1(h[:, :, None].expand(-1, -1, 5)).flatten(1)[:, :16]
        e = self.emb(tokens)
        a, _ = self.attn(e, e, e)
        return self.head(torch.relu(self.fc(h)) + self.norm(a).mean(1))


def _inputs(gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 6, 6, generator=gen), torch.randint(0, 10, (2, 5), generator=gen)


def test_wraps_known_layers_only_and_keeps_parameters():
    m = Mixed()
    params = {n: p for n, p in m.named_parameters()}
    keys = set(m.state_dict())
    prepare_qat(m, QATSpec(weight_bits=8, activation_bits=8))
    assert type(m.conv2) is QATConv2d and type(m.conv1) is QATConv1d
    assert type(m.fc) is QATLinear and type(m.head) is QATLinear
    # MultiheadAttention's out_proj is a Linear subclass it uses by weight, not by forward: untouched
    assert type(m.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert type(m.emb) is nn.Embedding and type(m.norm) is nn.LayerNorm
    assert sorted(n for n, _ in qat_layers(m)) == ["conv1", "conv2", "fc", "head"]
    for n, p in m.named_parameters():  # same Parameter objects (optimizers, tying survive)
        if n in params:
            assert p is params[n]
    assert keys <= set(m.state_dict())
    assert m.fc.weight_fq.per_channel and m.fc.weight_fq.scale.shape == (8,)
    assert m.fc.act_fq is not None and not m.fc.act_fq.per_channel
    prepare_qat(m)  # idempotent: already-converted layers stay as they are
    assert isinstance(m.fc.weight_fq, FakeQuantizer)


def test_filter_skip_and_skip_first_last():
    m = _mlp(depth=4)
    prepare_qat(m, module_filter_fn=lambda mod, fqn: fqn != "2")
    assert [n for n, _ in qat_layers(m)] == ["0", "4", "6"]
    m = _mlp(depth=4)
    prepare_qat(m, skip=["0"])
    assert [n for n, _ in qat_layers(m)] == ["2", "4", "6"]
    m = _mlp(depth=4)
    prepare_qat(m, module_filter_fn=skip_first_last(m))
    assert [n for n, _ in qat_layers(m)] == ["2", "4"]
    with pytest.raises(ValueError, match="skip"):
        prepare_qat(_mlp(), skip=["nope"])


def test_spec_overrides_and_validation():
    m = prepare_qat(_mlp(), QATSpec(weight_bits=8), weight_bits=4)
    assert m[0].weight_fq.bits == 4
    for kwargs, name in [(dict(weight_bits=9), "weight_bits"), (dict(activation_bits=1), "activation_bits"),
                         (dict(method="ema"), "method"), (dict(freeze_after=0), "freeze_after"),
                         (dict(averaging_constant=2.0), "averaging_constant")]:
        with pytest.raises(ValueError, match=name):
            QATSpec(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_same_shape_dtype_and_close_at_8_bits(dtype):
    m = Mixed().to(dtype)
    img, tok = _inputs()
    img = img.to(dtype)
    with torch.no_grad():
        ref = m(img, tok)
        prepare_qat(m, QATSpec(weight_bits=8, activation_bits=8))
        out = m(img, tok)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 0.05, rel


def test_qat_linear_is_linear_on_fake_quantized_tensors():
    m = prepare_qat(nn.Linear(6, 5), QATSpec(weight_bits=4, activation_bits=8))
    x = torch.randn(3, 6)
    y = m(x)
    w_fq = fake_quantize(m.weight, m.weight_fq.scale, m.weight_fq.zero_point, -8, 7, axis=0)
    x_fq = fake_quantize(x, m.act_fq.scale, m.act_fq.zero_point, 0, 255)
    assert torch.equal(y, nn.functional.linear(x_fq, w_fq, m.bias))


def _gpt2_classes():
    from distqat.models.hf import import_transformers

    import_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2Config, GPT2LMHeadModel


def test_conv1d_axis_is_output_features():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(12, 5)  # nf=12 outputs, nx=5 inputs: weight (5, 12)
    x = torch.randn(2, 3, 5)
    with torch.no_grad():
        ref = layer(x)
    prepare_qat(layer, QATSpec(weight_bits=8))
    assert isinstance(layer, Conv1D) and layer.weight_fq.ch_axis == 1
    assert layer.weight_fq.scale.shape == (12,)
    with torch.no_grad():
        out = layer(x)  # train mode: observes the weight
    w_fq = fake_quantize(layer.weight, layer.weight_fq.scale, layer.weight_fq.zero_point, -128, 127, axis=1)
    assert torch.equal(out, (x.reshape(-1, 5) @ w_fq + layer.bias).reshape(2, 3, 12))
    assert out.shape == ref.shape and (out - ref).norm() / ref.norm() < 0.02
    # per output channel: each column's absmax sits at the top of the grid
    assert torch.allclose(layer.weight_fq.scale, layer.weight.detach().abs().amax(0) / 127.5)


def test_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D
    GPT2Config, GPT2LMHeadModel = _gpt2_classes()

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
    prepare_qat(model, QATSpec(weight_bits=8), module_filter_fn=lambda mod, fqn: fqn != "lm_head")
    names = sorted(n for n, _ in qat_layers(model))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                     "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1D) and c_attn.weight.shape == (32, 96)
    assert c_attn.weight_fq.ch_axis == 1 and c_attn.weight_fq.scale.shape == (96,)  # one per output
    model.train()
    with torch.no_grad():
        model(ids)  # observe the weights once
    model.eval()
    with torch.no_grad():
        out = model(ids).logits
        x = torch.randn(2, 3, 32)
        w_fq = fake_quantize(c_attn.weight, c_attn.weight_fq.scale, c_attn.weight_fq.zero_point,
                             -128, 127, axis=1)
        assert torch.equal(c_attn(x), (x.reshape(-1, 32) @ w_fq + c_attn.bias).reshape(2, 3, 96))
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out - ref).norm() / ref.norm() < 0.02
    strip_qat(model)
    assert type(c_attn) is Conv1D and not hasattr(c_attn, "weight_fq")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("method", ["minmax", "lsq"])
def test_training_with_qat_reduces_loss(method):
    torch.manual_seed(0)
    teacher = _mlp(width=16, depth=2, seed=1)
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = teacher(x)
    student = prepare_qat(_mlp(width=16, depth=3, seed=2),
                          QATSpec(weight_bits=4, activation_bits=8, method=method))
    student(x)  # first forward initialises every quantizer from the data
    # LSQ steps get their own, smaller learning rate (see qat_param_groups)
    opt = torch.optim.Adam(qat_param_groups(student, scale_lr=1e-3), lr=3e-3)
    assert len(opt.param_groups) == (2 if method == "lsq" else 1)
    losses = []
    for _ in range(150):
        loss = nn.functional.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    if method == "lsq":
        assert student[0].weight_fq.scale.grad is not None


def test_optimizer_built_before_prepare_still_trains_the_weights():
    m = _mlp(width=8, depth=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    prepare_qat(m, QATSpec(weight_bits=4))
    before = m[0].weight.detach().clone()
    m(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert not torch.equal(m[0].weight, before)


def test_strip_qat_restores_float_layers():
    m = Mixed()
    img, tok = _inputs()
    with torch.no_grad():
        ref = m(img, tok)
    strip_qat(prepare_qat(m, QATSpec(weight_bits=4, activation_bits=4)))
    assert type(m.fc) is nn.Linear and type(m.conv2) is nn.Conv2d and not list(qat_layers(m))
    assert set(m.state_dict()) == set(Mixed().state_dict())
    with torch.no_grad():
        assert torch.equal(m(img, tok), ref)
