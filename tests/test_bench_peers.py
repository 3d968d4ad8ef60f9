"""bench/peers.py's peer helpers on real processes (gloo, loopback): the DDP replica
counts exactly the gradient bytes it hands to all_reduce, and the
torch.distributed.pipelining peer trains distqat's own stages (its first loss is the full
model's on the same batch). Both are what the benchmark's comparisons rest on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # the spawned ranks inherit it and import peers

import peers  # noqa: E402

from distqat.data import make_task  # noqa: E402
from distqat.pipeline.build import build_full  # noqa: E402

SMALL = ["model_pipeline.model_args.hidden=64", "model_pipeline.model_args.depth=2",
         "diloco.batch_size_per_step=16", "data.eval_samples=64"]


def _full_model_loss(overrides):
    cfg = peers._config(overrides)
    task = make_task(cfg.data)
    model = build_full(cfg, task.model_io())
    x, y = task.batch(0, 0, cfg.diloco.batch_size_per_step)
    with torch.no_grad():
        loss = task.objective.loss(model(x), y).item()
        ex, ey = task.eval_set()
        eval_loss = task.objective.loss(model(ex), ey).item()
    return loss, eval_loss, sum(p.numel() for p in model.parameters())


def test_ddp_replica_counts_gradient_bytes_and_evaluates():
    overrides = peers.DILOCO_COMMON + SMALL
    _, eval_loss, n_params = _full_model_loss(overrides)
    ranks = peers._spawn(peers.ddp_replica, 2, (overrides, 3), timeout=120)
    for r in ranks:  # every step, every rank: all fp32 gradients once
        assert r["bytes"] == 3 * 4 * n_params
        assert r["samples"] == 3 * 16
    assert ranks[0]["eval_first"] == pytest.approx(eval_loss, rel=1e-5)
    assert ranks[0]["eval_last"] < ranks[0]["eval_first"]


def test_peer_pipeline_trains_distqats_stages():
    overrides = peers.PIPE_COMMON + SMALL + ["model_pipeline.num_stages=2"]
    loss, _, _ = _full_model_loss(overrides)
    out = peers.run_peer(overrides, [("gpipe", 2), ("1f1b", 4)], steps=2, timeout=120)
    for setup in (("gpipe", 2), ("1f1b", 4)):
        assert out[setup]["loss_first"] == pytest.approx(loss, rel=1e-5)
        assert out[setup]["samples_per_s"] > 0
