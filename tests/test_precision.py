"""``precision: bf16``: autocast per stage, float32 where it must stay float32."""

import pytest
import torch

from distqat.elastic.dist import stage_backend
from distqat.quant.fake_quant import FakeQuantizer

from conftest import failure_text


def test_fake_quant_of_bfloat16_input_rounds_in_float32():
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 3
    fq32, fq16 = (FakeQuantizer(bits=8) for _ in range(2))
    want = fq32(x.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fq16(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert fq16.scale.dtype == torch.float32
    torch.testing.assert_close(fq16.scale, fq32.scale, rtol=0, atol=0)
    torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("devices, backend", [
    (["cuda:0", "cuda:1"], "nccl"),
    (["cuda:0", "cpu"], "gloo"),  # a CPU host in the stage: gloo over CPU copies
    (["cpu", "cpu"], "gloo"),
    (["cuda:0"], "nccl"),
])
def test_a_stage_group_is_nccl_only_where_every_member_is_on_cuda(devices, backend):
    assert stage_backend(devices) == backend


@pytest.mark.timeout(240)
def test_bf16_training_sends_half_the_activation_bytes_and_learns(runs):
    args = ["diloco.outer_steps=3", "eval_every=3"]
    fp32 = runs.summary(*args)
    bf16 = runs.summary(*args, "precision=bf16")
    assert bf16["activation_bytes"] * 2 == fp32["activation_bytes"]
    assert bf16["loss_last"] < bf16["loss_first"] - 0.1
    # the same model in bfloat16 autocast: close to float32, not equal
    assert bf16["loss_last"] == pytest.approx(fp32["loss_last"], rel=0.05)
    assert bf16["loss_last"] != fp32["loss_last"]
