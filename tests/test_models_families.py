"""Model families at tiny sizes: each equals its reference implementation with the same
weights, stages built alone equal the same blocks of the whole model, costs follow compute,
and QAT + integer export round-trip exactly."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
from torch import nn

from distqat.models import (available_models, block_costs, build_blocks, check_model,
                            cut_points)
from distqat.models.hf import hf_state_dict, import_transformers
from distqat.quant import QATSpec, load_into, prepare_qat, quantizers, save_export

tf = import_transformers()

GPT2_ARGS = dict(n_layer=2, n_embd=32, n_head=4, n_positions=16)
NEO_ARGS = dict(num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=16,
                window_size=4)
LM_IO = dict(vocab_size=97, seq_len=12)
W2V_CONV = dict(conv_dim=[8, 8, 8], conv_kernel=[10, 3, 3], conv_stride=[5, 2, 2],
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                classifier_proj_size=16)
W2V_ARGS = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32, config=W2V_CONV)
W2V_IO = dict(input_shape=[800], num_classes=5)
IMG_IO = dict(input_shape=[3, 8, 8], num_classes=10)
R18_ARGS = dict(layers=[1, 1, 1, 1], norm="group")
R50_ARGS = dict(layers=[1, 1, 1, 1], width_per_group=16)

# name, io, model_args, a batch
TINY = {
    "mlp": ("mlp", dict(input_shape=[6], num_classes=3), {}, lambda: torch.randn(4, 6)),
    "cnn": ("cnn", dict(input_shape=[1, 8, 8], num_classes=3), {}, lambda: torch.randn(4, 1, 8, 8)),
    "resnet18": ("resnet18", IMG_IO, R18_ARGS, lambda: torch.randn(4, 3, 8, 8)),
    "resnet50": ("resnet50", IMG_IO, R50_ARGS, lambda: torch.randn(4, 3, 8, 8)),
    "gpt2": ("distilgpt2", LM_IO, GPT2_ARGS, lambda: torch.randint(0, 97, (3, 12))),
    "gpt2-eager": ("distilgpt2", LM_IO, {**GPT2_ARGS, "attn_implementation": "eager"},
                   lambda: torch.randint(0, 97, (3, 12))),
    "gptneo": ("gptneo", LM_IO, NEO_ARGS, lambda: torch.randint(0, 97, (3, 12))),
    "wav2vec2": ("wav2vec2", W2V_IO, W2V_ARGS, lambda: torch.randn(3, 800)),
}


def _run(blocks, x):
    for b in blocks:
        x = b(x)
    return x


def _blocks(key, seed=3, blocks=None, dtype=torch.float64):
    name, io, args, _ = TINY[key]
    return [b.to(dtype) for b in build_blocks(name, io=io, seed=seed, model_args=args, blocks=blocks)]


def _float_input(key, dtype=torch.float64):
    torch.manual_seed(0)
    x = TINY[key][3]()
    return x if x.dtype == torch.long else x.to(dtype)


def test_registry_lists_families():
    assert {"mlp", "cnn", "resnet18", "resnet50", "resnet101", "distilgpt2", "gptneo",
            "wav2vec2"} <= set(available_models())


def test_check_model_errors_name_the_field():
    check_model("resnet18", {"norm": "group"})
    with pytest.raises(ValueError, match=r"model_pipeline.model: unknown model 'resnet19'"):
        check_model("resnet19", {})
    with pytest.raises(ValueError, match=r"model_pipeline.model_args for 'distilgpt2'.*n_layers"):
        check_model("distilgpt2", {"n_layers": 3})
    with pytest.raises(ValueError, match=r"model_args for 'mlp'.*num_classes"):
        check_model("mlp", {"num_classes": 3})
    with pytest.raises(ValueError, match=r"model_args for 'resnet18'.*norm"):
        build_blocks("resnet18", io=IMG_IO, seed=0, model_args={"norm": "layer"})
    with pytest.raises(ValueError, match=r"model_args for 'gptneo'.*not fields of GPTNeoConfig"):
        build_blocks("gptneo", io=LM_IO, seed=0, model_args={**NEO_ARGS, "config": {"nope": 1}})


# --------------------------------------------------------------------------- references

def _resnet_reference(arch, args, blocks):
    tv = pytest.importorskip("distqat.compat").import_torchvision()
    kw = dict(num_classes=10)
    if "width_per_group" in args:
        kw["width_per_group"] = args["width_per_group"]
    if args.get("norm") == "group":
        kw["norm_layer"] = lambda c: nn.GroupNorm(32, c)
    block_cls = tv.models.resnet.BasicBlock if arch == "resnet18" else tv.models.resnet.Bottleneck
    ref = tv.models.resnet.ResNet(block_cls, args["layers"], **kw)
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool = nn.Identity()
    ref = ref.double()
    names = ["conv1", "bn1"]
    state = {}
    for k, v in blocks[0].state_dict().items():
        i, rest = k.split(".", 1)
        state[f"{names[int(i)]}.{rest}"] = v
    residual = [f"layer{l}.{j}" for l in range(1, 5) for j in range(args["layers"][l - 1])]
    for name, b in zip(residual, blocks[1:-1]):
        state.update({f"{name}.{k}": v for k, v in b.state_dict().items()})
    state.update({f"fc.{k.split('.', 1)[1]}": v for k, v in blocks[-1].state_dict().items()})
    ref.load_state_dict(state, strict=True)
    return ref


def _hf_reference(key, blocks):
    if key.startswith("gpt2"):
        impl = "eager" if key == "gpt2-eager" else "sdpa"
        cfg = tf.GPT2Config(vocab_size=97, tie_word_embeddings=False, attn_implementation=impl,
                            **GPT2_ARGS)
        ref = tf.GPT2LMHeadModel(cfg)
    elif key == "gptneo":
        cfg = tf.GPTNeoConfig(vocab_size=97, tie_word_embeddings=False,
                              attention_types=[[["global", "local"], 1]], **NEO_ARGS)
        ref = tf.GPTNeoForCausalLM(cfg)
    else:
        cfg = tf.Wav2Vec2Config(vocab_size=32, num_labels=5, layerdrop=0.0, mask_time_prob=0.0,
                                **{k: v for k, v in W2V_ARGS.items() if k != "config"}, **W2V_CONV)
        ref = tf.Wav2Vec2ForSequenceClassification(cfg)
    ref = ref.double().eval()
    ref.load_state_dict(hf_state_dict(blocks), strict=True)
    return lambda x: ref(x).logits


@pytest.mark.parametrize("key", ["resnet18", "resnet50", "gpt2", "gpt2-eager", "gptneo", "wav2vec2"])
def test_blocks_compose_to_the_reference_model(key):
    blocks = [b.eval() for b in _blocks(key)]
    if key.startswith("resnet"):
        ref = _resnet_reference(key, TINY[key][2], blocks).eval()
    else:
        ref = _hf_reference(key, blocks)
    x = _float_input(key)
    with torch.no_grad():
        out, expected = _run(blocks, x), ref(x)
    assert torch.equal(out, expected)
    if key.startswith("gpt"):  # causal: a later token changes no earlier logit
        x2 = x.clone()
        x2[:, -1] = (x2[:, -1] + 1) % 97
        with torch.no_grad():
            out2 = _run(blocks, x2)
        assert torch.equal(out2[:, :-1], out[:, :-1]) and not torch.equal(out2[:, -1], out[:, -1])


def test_gpt2_eager_and_sdpa_agree():
    x = _float_input("gpt2")
    with torch.no_grad():
        a = _run([b.eval() for b in _blocks("gpt2")], x)
        b = _run([b.eval() for b in _blocks("gpt2-eager")], x)
    assert torch.allclose(a, b, atol=1e-10)


def test_gptneo_local_window_is_applied():
    """A local layer with window 4 ignores tokens more than 4 back; a global one does not."""
    blocks = [b.eval() for b in _blocks("gptneo")]
    h = torch.randn(1, 12, 32, dtype=torch.float64)
    h2 = h.clone()
    h2[:, 0] += torch.randn(32, dtype=torch.float64)  # (a constant would vanish in LayerNorm)
    with torch.no_grad():
        glob = blocks[1](h2) - blocks[1](h)
        local = blocks[2](h2) - blocks[2](h)
    assert glob[:, 11].abs().max() > 0 and local[:, 11].abs().max() == 0
    assert local[:, 3].abs().max() > 0


# --------------------------------------------------------------------------- stages alone

@pytest.mark.parametrize("key", list(TINY))
def test_blocks_built_alone_equal_blocks_of_the_whole(key):
    whole = _blocks(key, seed=11)
    n = len(whole)
    for part in {range(0, 1), range(1, n - 1) if n > 2 else range(1, n), range(n - 1, n)}:
        alone = _blocks(key, seed=11, blocks=part)
        for a, w in zip(alone, whole[part.start:part.stop]):
            sa, sw = a.state_dict(), w.state_dict()
            assert sa.keys() == sw.keys()
            assert all(torch.equal(sa[k], sw[k]) for k in sa)
            for (na, ba), (_, bw) in zip(a.named_buffers(), w.named_buffers()):
                assert torch.equal(ba, bw), na  # non-persistent ones too (GPT-Neo's mask)
    other = _blocks(key, seed=12)
    assert any(not torch.equal(p, q) for p, q in zip(other[-1].parameters(), whole[-1].parameters()))


def test_a_stage_never_allocates_the_whole_model():
    """One layer of GPT-Neo 125M: its own parameters only, and far less memory than the
    ~500 MB of the whole model."""
    io = dict(vocab_size=50257, seq_len=128)
    build_blocks("gptneo", io=LM_IO, seed=0, model_args=NEO_ARGS, blocks=range(1, 2))  # warm
    gc.collect()
    rss = psutil.Process().memory_info().rss
    (layer,) = build_blocks("gptneo", io=io, seed=0, blocks=range(5, 6))
    grown = psutil.Process().memory_info().rss - rss
    with torch.device("meta"):
        whole = tf.GPTNeoForCausalLM(tf.GPTNeoConfig(
            vocab_size=50257, num_layers=12, hidden_size=768, num_heads=12,
            attention_types=[[["global", "local"], 6]], tie_word_embeddings=False))
    own = sum(p.numel() for p in whole.transformer.h[5].parameters())
    assert sum(p.numel() for p in layer.parameters()) == own
    assert own < sum(p.numel() for p in whole.parameters()) / 15
    assert grown < 120e6, grown  # the layer is 28 MB + its 16 MB mask; the model ~500 MB


def test_a_block_range_out_of_bounds_is_an_error():
    with pytest.raises(ValueError, match="contiguous part of the 5 blocks"):
        build_blocks("mlp", io=dict(input_shape=[4], num_classes=2), seed=0, blocks=range(3, 7))


# --------------------------------------------------------------------------- costs and cuts

def test_costs_follow_compute_not_parameters():
    costs = block_costs("distilgpt2", io=dict(vocab_size=50257, seq_len=128))
    blocks = build_blocks("distilgpt2", io=dict(vocab_size=50257, seq_len=128), seed=0,
                          model_args=dict(n_layer=1), blocks=range(0, 2))
    emb_params, layer_params = (sum(p.numel() for p in b.parameters()) for b in blocks)
    assert emb_params > 4 * layer_params
    assert costs[0] < 0.01 * costs[1]
    assert costs[1] == pytest.approx(2 * 128 * 7.08e6, rel=0.1)  # 2 FLOPs/param/token + attention
    assert len(set(costs[1:-1])) == 1
    resnet = block_costs("resnet18", io=dict(input_shape=[3, 32, 32], num_classes=10))
    assert resnet[-1] < 0.01 * max(resnet) and all(c > 0 for c in resnet)


def test_cut_points_balance_costs():
    assert cut_points([1, 1, 1, 1], 2) == [0, 2, 4]
    assert cut_points([0, 1, 1, 1, 5], 2) == [0, 4, 5]
    assert cut_points([0, 0, 0], 3) == [0, 1, 2, 3]
    costs = block_costs("resnet50", io=dict(input_shape=[3, 32, 32], num_classes=10))
    for s in (2, 3, 4):
        cuts = cut_points(costs, s)
        sums = [sum(costs[a:b]) for a, b in zip(cuts, cuts[1:])]
        assert len(sums) == s and all(b > a for a, b in zip(cuts, cuts[1:]))
        assert max(sums) < 1.5 * sum(costs) / s
    with pytest.raises(ValueError, match=r"model_pipeline.num_stages: the model has 3 blocks, "
                                         r"so it can be cut into 1..3 stages, not 4"):
        cut_points([1, 2, 3], 4)


# --------------------------------------------------------------------------- pretrained

def test_pretrained_folder_loads_only_each_blocks_own_weights(tmp_path):
    cfg = tf.GPT2Config(vocab_size=97, **GPT2_ARGS)  # tied, as hub GPT-2 checkpoints are
    torch.manual_seed(5)
    ref = tf.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    args = {**GPT2_ARGS, "pretrained": str(tmp_path)}
    blocks = [b.eval() for b in build_blocks("distilgpt2", io=LM_IO, seed=0, model_args=args)]
    assert torch.equal(blocks[-1].lm_head.weight, ref.lm_head.weight)
    assert blocks[-1].lm_head.weight.data_ptr() != blocks[0].wte.weight.data_ptr()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(_run(blocks, x), ref(x).logits)
    (last,) = build_blocks("distilgpt2", io=LM_IO, seed=0, model_args=args, blocks=range(3, 4))
    assert torch.equal(last.lm_head.weight, ref.lm_head.weight)
    with pytest.raises(ValueError, match=r"pretrained: '.*nowhere' is not a from_pretrained folder"):
        build_blocks("distilgpt2", io=LM_IO, seed=0, model_args={"pretrained": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="vocab_size is 97, the task's tokenizer has 50"):
        build_blocks("distilgpt2", io=dict(vocab_size=50, seq_len=8), seed=0, model_args=args)


# --------------------------------------------------------------------------- QAT

EXPECTED_QAT = {
    "resnet18": (nn.Conv2d, nn.Linear),  # resnet50: the same layer types, 8x slower here
    "gpt2": ("Conv1D", nn.Linear), "gptneo": (nn.Linear,), "wav2vec2": (nn.Conv1d, nn.Linear),
}


@pytest.mark.parametrize("key", list(EXPECTED_QAT))
def test_qat_and_export_round_trip(tmp_path, key):
    spec = QATSpec(weight_bits=4, activation_bits=8)
    model = prepare_qat(nn.Sequential(*_blocks(key, dtype=torch.float32)), spec)
    fqs = quantizers(model)
    layers = {fqn[: -len(".weight_fq")] for fqn in fqs if fqn.endswith(".weight_fq")}
    kinds = {m._float_cls.__name__ for n, m in model.named_modules() if n in layers}
    assert {w if isinstance(w, str) else w.__name__ for w in EXPECTED_QAT[key]} == kinds
    float_left = [n for n, m in model.named_modules()
                  if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d)]
    assert float_left == []
    if key == "wav2vec2":  # the weight-normed positional conv stays float (see docstring)
        assert not hasattr(model[4].pos_conv_embed.conv, "weight_fq")
    x = _float_input(key, torch.float32)
    model.train()
    out = model(x)
    out.float().pow(2).mean().backward()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "m.safetensors"
    save_export(path, model)
    fresh = prepare_qat(nn.Sequential(*_blocks(key, seed=99, dtype=torch.float32)), spec).eval()
    load_into(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
