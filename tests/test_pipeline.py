"""The RPC pipeline against its single-process twin, through the real launcher."""

import pytest
import torch
import torch.nn.functional as F

from distqat.config import load_config
from distqat.data import make_task
from distqat.pipeline.build import build_full

from conftest import failure_text

# one replica, outer SGD lr 1 without momentum: the outer step leaves the inner step's
# parameters (test_diloco checks it), so the saved stages are the result of one step
ONE_INNER_STEP = ["diloco.inner_steps=1", "diloco.outer_steps=1", "dtype=float64",
                  "diloco.inner_optim.name=sgd", "diloco.inner_optim.lr=0.5",
                  "diloco.outer_optim.lr=1.0", "diloco.outer_optim.momentum=0",
                  "diloco.outer_optim.nesterov=false", "eval_every=0"]


def _full_model_one_step(overrides):
    cfg = load_config(None, overrides)
    task = make_task(cfg.data)
    model = build_full(cfg, task.model_io()).double()
    x, y = task.batch(0, 0, cfg.diloco.batch_size_per_step)
    F.cross_entropy(model(x.double()), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= cfg.diloco.inner_optim.lr * p.grad
    return model.state_dict()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("nproc, extra", [
    # 64 samples in 3 micro-batches: 22 + 21 + 21 (tests/test_schedules.py covers every
    # schedule with 1..8 micro-batches in-process; these two go through the launcher)
    (2, ["model_pipeline.num_stages=2", "model_pipeline.num_microbatches=3",
         "model_pipeline.schedule=gpipe"]),
    (3, ["model_pipeline.model=cnn", "data.input_shape=[1,8,8]",
         "model_pipeline.num_stages=3", "model_pipeline.num_microbatches=4",
         "model_pipeline.schedule=1f1b"]),
])
def test_one_inner_step_equals_full_model(launcher, nproc, extra):
    overrides = ONE_INNER_STEP + extra
    code, out = launcher.run("--nproc", str(nproc), *overrides)
    assert code == 0, failure_text(out)
    want = _full_model_one_step(overrides)
    got = {}
    final = launcher.cwd / "runs" / "tiny" / "final"
    stages = sorted(final.glob("stage*.pt"))
    assert len(stages) == nproc
    for stage, path in enumerate(stages):
        # stage s is nn.Sequential(blocks...) with keys "i.<rest>"; the full model numbers
        # blocks consecutively, so shift stage-local block indices by the blocks before
        state = torch.load(path, weights_only=True)
        blocks = sorted({int(k.split(".")[0]) for k in state})
        offset = len({int(k.split(".")[0]) for k in got})
        for k, v in state.items():
            head, rest = k.split(".", 1)
            got[f"{int(head) + offset}.{rest}"] = v
        del blocks
    assert set(got) == set(want)
    for k in want:
        # float64 end to end; only summation order differs (micro-batch split, RPC)
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
