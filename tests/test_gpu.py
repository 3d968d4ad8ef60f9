"""The GPU path end to end. CI has no GPU: these skip there, saying so; they run wherever
torch sees a CUDA device (BENCHMARKS.md says where they last ran)."""

import pytest
import torch

from test_pipeline import ONE_INNER_STEP, _full_model_one_step

from conftest import failure_text

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this host (CI has none)")


@pytest.mark.timeout(300)
def test_two_workers_train_on_cuda(launcher):
    code, out = launcher.run("world_size=2", "device=cuda", "diloco.outer_steps=3")
    assert code == 0, failure_text(out)
    summary = launcher.summary()
    assert summary["loss_last"] < summary["loss_first"]
    assert "stage 0 nccl" in (launcher.cwd / "runs" / "tiny" / "logs" / "rank0.log").read_text()


@pytest.mark.timeout(300)
def test_one_inner_step_on_cuda_equals_the_full_model(launcher):
    overrides = ONE_INNER_STEP + ["model_pipeline.num_stages=2",
                                  "model_pipeline.num_microbatches=3"]
    code, out = launcher.run("--nproc", "2", *overrides, "device=cuda")
    assert code == 0, failure_text(out)
    want = _full_model_one_step(overrides)
    final = launcher.cwd / "runs" / "tiny" / "final"
    got = {}
    for stage, path in enumerate(sorted(final.glob("stage*.pt"))):
        state = torch.load(path, weights_only=True)
        offset = len({int(k.split(".")[0]) for k in got})
        for k, v in state.items():
            head, rest = k.split(".", 1)
            got[f"{int(head) + offset}.{rest}"] = v
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11)


@pytest.mark.timeout(300)
def test_bf16_training_on_cuda(launcher):
    code, out = launcher.run("world_size=4", "device=cuda", "precision=bf16",
                             "diloco.outer_steps=4")
    assert code == 0, failure_text(out)
    summary = launcher.summary()
    assert summary["loss_last"] < summary["loss_first"] - 0.1
