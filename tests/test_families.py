"""Every model family through the real launcher, at a tiny size: 2- and 3-stage pipelines
after one inner step against ``.full`` trained in one process on the same batch, and a run
on data written to disk in the hub's schema whose loss falls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from distqat.config import load_config
from distqat.data import make_task
from distqat.pipeline.build import build_full

from hub_datasets import cifar_like, speech_like, wikitext_like

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
W2V = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 32,
       "config": {"conv_dim": [8, 8, 8], "conv_kernel": [10, 3, 3], "conv_stride": [5, 2, 2],
                  "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4,
                  "classifier_proj_size": 16, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "activation_dropout": 0.0, "feat_proj_dropout": 0.0, "final_dropout": 0.0}}
# family -> (dataset writer, data section, model section); tiny sizes of the real code
FAMILIES = {
    "resnet18": (lambda d: cifar_like(d, n_train=96, size=16),
                 {"name": "image", "args": {"num_classes": 10}},
                 {"model": "resnet18", "model_args": {"layers": [1, 1, 1, 1], "norm": "group"}}),
    "distilgpt2": (lambda d: wikitext_like(d, n_train=200),
                   {"name": "text", "args": {"seq_len": 16, "tokenizer": "byte"}},
                   {"model": "distilgpt2", "model_args": {
                       "n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 16,
                       "config": NO_DROPOUT}}),
    "gptneo": (lambda d: wikitext_like(d, n_train=200),
               {"name": "text", "args": {"seq_len": 16, "tokenizer": "byte"}},
               {"model": "gptneo", "model_args": {
                   "num_layers": 2, "hidden_size": 32, "num_heads": 4,
                   "max_position_embeddings": 16, "window_size": 4,
                   "config": {"embed_dropout": 0.0, "attention_dropout": 0.0,
                              "resid_dropout": 0.0}}}),
    "wav2vec2": (lambda d: speech_like(d, n_train=64),
                 {"name": "audio", "args": {"num_classes": 4, "num_samples": 800}},
                 {"model": "wav2vec2", "model_args": W2V}),
}


def _config(tmp: Path, family: str, **extra) -> Path:
    """A config file for ``family`` on its dataset (written once per folder)."""
    write, data, model = FAMILIES[family]
    path = tmp / f"{family}-data"
    if not path.exists():
        write(path)
    cfg = {"experiment_prefix": "fam", "data": {**data, "path": str(path), "eval_samples": 16},
           "model_pipeline": dict(model), **extra}
    out = tmp / f"{family}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


# one replica; one inner step of plain SGD; an outer SGD step at lr 1 without momentum
# leaves the inner step's parameters (tests/test_diloco.py checks it)
ONE_STEP = {"dtype": "float64", "eval_every": 0, "seed": 3,
            "diloco": {"inner_steps": 1, "outer_steps": 1, "batch_size_per_step": 8,
                       "inner_optim": {"name": "sgd", "lr": 0.1},
                       "outer_optim": {"name": "sgd", "lr": 1.0, "momentum": 0.0,
                                       "nesterov": False}}}


def _full_after_one_step(config: Path):
    cfg = load_config(config)
    task = make_task(cfg.data)
    model = build_full(cfg, task.model_io()).double()
    x, y = task.batch(0, 0, cfg.diloco.batch_size_per_step)
    x = task.objective.prepare_input(x, torch.float64)
    task.objective.loss(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= cfg.diloco.inner_optim.lr * p.grad
    return model.state_dict()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_and_three_stages_equal_full_model_after_one_step(launcher, family):
    for stages in (2, 3):
        config = _config(launcher.cwd, family, **ONE_STEP, model_pipeline={
            **FAMILIES[family][2], "num_stages": stages, "num_microbatches": 3})
        code, out = launcher.run("--config", str(config), "--nproc", str(stages))
        assert code == 0, out[-4000:]
        want = _full_after_one_step(config)
        got, offset = {}, 0
        for s in range(stages):
            state = torch.load(launcher.cwd / "runs" / "fam" / "final" / f"stage{s}.pt",
                               weights_only=True)
            blocks = {int(k.split(".")[0]) for k in state}
            got.update({f"{int(k.split('.', 1)[0]) + offset}.{k.split('.', 1)[1]}": v
                        for k, v in state.items()})
            offset += len(blocks)
        assert set(got) == set(want), (family, stages)
        for k in want:
            # float64 throughout; only the summation order differs (micro-batches, RPC)
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11,
                                       msg=f"{family} {stages} stages: {k}")
        init = build_full(load_config(config), make_task(load_config(config).data).model_io())
        moved = sum(not torch.equal(v.double(), want[k]) for k, v in init.state_dict().items())
        assert moved > 0, "the step changed nothing: the comparison proves nothing"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["resnet18", "distilgpt2", "wav2vec2"])
def test_family_learns_on_hub_schema_data(launcher, family):
    config = _config(launcher.cwd, family, eval_every=2, diloco={
        "inner_steps": 5, "outer_steps": 8, "batch_size_per_step": 16,
        "inner_optim": {"name": "adamw", "lr": 0.003}},
        model_pipeline={**FAMILIES[family][2], "num_stages": 2, "num_microbatches": 2})
    code, out = launcher.run("--config", str(config), "--nproc", "4")
    assert code == 0, out[-4000:]
    summary = launcher.summary("fam")
    assert summary["exit_reason"] == "completed" and summary["num_replicas"] == 2
    # 40 inner steps of a tiny model on tiny data: the loss falls, on training and held-out
    assert summary["loss_last"] < summary["loss_first"], summary
    first, last = summary["eval_first"], summary["eval_last"]
    assert last["loss"] < first["loss"], (first, last)
    metric = "perplexity" if family == "distilgpt2" else "accuracy"
    assert metric in last
