"""Both pipeline schedules against the single-process twin, in real RPC worlds.

One world per stage count (2: the MLP; 3: the CNN), each a set of spawned processes
joined by TensorPipe on loopback: rank 0 drives and hosts stage 0, rank r hosts stage r.
Inside one world the driver rebuilds every stage from the seed (``build_stage_host``, as a
worker does) for each (schedule, micro-batch count) and takes one inner SGD step on a
batch of 10 samples, in float64: 1..8 micro-batches, uneven for 3, 4, 6, 7 and 8. After
the step the stages must hold the full model's parameters after the same step. The
2-stage world also trains a few steps with the int8 activation wire under each schedule.
Stages are built as a worker builds them, with no outer step: they write no files.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed.rpc as rpc
import torch.nn.functional as F

from distqat import config
from distqat.config import ConfigError, load_config
from distqat.data import make_objective, make_task
from distqat.elastic import dist as dq_dist
from distqat.pipeline import schedule, stage
from distqat.pipeline.build import build_full, build_stage_host
from distqat.pipeline.driver import PipelineDriver, split

from mp import rank_store, run_ranks

BATCH, LR, RPC_TIMEOUT = 10, 0.5, 60.0
MICROBATCHES = range(1, 9)
ONE_STEP = ["dtype=float64", "diloco.inner_optim.name=sgd", f"diloco.inner_optim.lr={LR}",
            f"diloco.batch_size_per_step={BATCH}"]
WORLDS = {2: ["model_pipeline.num_stages=2"],
          3: ["model_pipeline.model=cnn", "data.input_shape=[1,8,8]",
              "model_pipeline.num_stages=3"]}
INT8 = ["quant.wire.activations=int8", "diloco.inner_optim.name=sgd", "diloco.inner_optim.lr=0.2",
        "diloco.batch_size_per_step=32", "model_pipeline.num_stages=2",
        "model_pipeline.num_microbatches=4"]
INT8_STEPS = 12


# ---- run on the workers, through RPC ----------------------------------------------------

def _host(cfg: config.Config, stage_index: int) -> None:
    """Build (from the seed) and host this worker's stage, as a worker does each round."""
    io = make_task(cfg.data).model_io()
    stage.unhost_all()
    build_stage_host(cfg, stage=stage_index, replica=0, io=io, group=None, state=None,
                     device=torch.device("cpu"), checkpoint_folders=[])


def _connect(stage_index: int, next_owner: str) -> None:
    stage._lookup(stage_index).connect_next(stage.stage_rref(next_owner, stage_index + 1,
                                                             RPC_TIMEOUT))


def _pipeline(overrides, world: int) -> PipelineDriver:
    """Fresh stages on every worker, chained, and rank 0's driver over them."""
    cfg = load_config(None, overrides)
    name = dq_dist.worker_name
    for r in range(1, world):
        rpc.rpc_sync(name(r), _host, args=(cfg, r), timeout=RPC_TIMEOUT)
    _host(cfg, 0)
    for s in range(world - 1):
        rpc.rpc_sync(name(s), _connect, args=(s, name(s + 1)), timeout=RPC_TIMEOUT)
    rest = [stage.stage_rref(name(r), r, RPC_TIMEOUT) for r in range(1, world)]
    pipe = cfg.model_pipeline
    return PipelineDriver(stage._lookup(0), rest, objective=make_objective(cfg.data),
                          num_microbatches=pipe.num_microbatches, rpc_timeout=RPC_TIMEOUT,
                          dtype=getattr(torch, cfg.dtype), schedule=pipe.schedule)


def _as_full(states):
    """Stage state dicts as one dict keyed like the full model (blocks renumbered)."""
    full = {}
    for state in states:
        offset = len({k.split(".")[0] for k in full})
        for k, v in state.items():
            head, rest = k.split(".", 1)
            full[f"{int(head) + offset}.{rest}"] = v
    return full


def _full_one_step(overrides):
    cfg = load_config(None, overrides)
    task = make_task(cfg.data)
    model = build_full(cfg, task.model_io()).double()
    x, y = task.batch(0, 0, BATCH)
    loss = F.cross_entropy(model(x.double()), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return loss.item(), model.state_dict()


def _rpc_world(rank: int, world: int, job):
    env = dq_dist.DistEnv(rank=rank, world_size=world, local_rank=0, master_addr="127.0.0.1",
                          master_port=0, restart_count=0)
    dq_dist.init_rpc(env, rank_store("rpc"), num_threads=8, rpc_timeout=RPC_TIMEOUT,
                     init_timeout=RPC_TIMEOUT)
    try:
        return job(world) if rank == 0 else None
    finally:
        rpc.shutdown()  # graceful: every worker waits until the driver is done


def _equivalence(world: int):
    """(schedule, micro-batches) -> (largest parameter error, loss, the twin's loss,
    inner steps each stage counted)."""
    base = ONE_STEP + WORLDS[world]
    want_loss, want = _full_one_step(base)
    x, y = make_task(load_config(None, base).data).batch(0, 0, BATCH)
    results = {}
    for name in schedule.SCHEDULES:
        for m in MICROBATCHES:
            driver = _pipeline(base + [f"model_pipeline.schedule={name}",
                                       f"model_pipeline.num_microbatches={m}"], world)
            stats = driver.train_step(x, y)
            got = _as_full(driver.state_dicts())
            assert set(got) == set(want)
            error = max((got[k] - want[k]).abs().max().item() for k in want)
            steps = [s["inner_steps_done"] for s in driver.summaries()]
            results[(name, m)] = (error, stats.loss, want_loss, steps)
    return results


def _int8_training(world: int):
    """schedule -> (losses of INT8_STEPS inner steps, wire bytes (activations, gradients))."""
    task = make_task(load_config(None, INT8).data)
    out = {}
    for name in schedule.SCHEDULES:
        driver = _pipeline(INT8 + [f"model_pipeline.schedule={name}"], world)
        losses = [driver.train_step(*task.batch(0, i * 32, 32)).loss for i in range(INT8_STEPS)]
        out[name] = (losses, driver.wire_bytes())
    return out


def _everything(world: int):
    """What the tests read from one world (a world costs seconds to start: one per size)."""
    return {"equivalence": _equivalence(world),
            "int8": _int8_training(world) if world == 2 else None}


# ---- the tests ----------------------------------------------------------------------------

_WORLDS: dict = {}


def _world_results(world: int) -> dict:
    if world not in _WORLDS:
        _WORLDS[world] = run_ranks(_rpc_world, world, _everything, timeout=200)[0]
    return _WORLDS[world]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", sorted(WORLDS))
def test_every_schedule_and_microbatch_count_equals_the_full_model(world):
    results = _world_results(world)["equivalence"]
    assert set(results) == {(s, m) for s in schedule.SCHEDULES for m in MICROBATCHES}
    for (name, m), (error, loss, want_loss, steps) in results.items():
        # float64 end to end; only the order of sums differs (micro-batches, RPC)
        assert error < 1e-12, f"{name}, {m} micro-batches: parameters off by {error}"
        assert loss == pytest.approx(want_loss, rel=1e-12), (name, m)
        assert steps == [1] * world, (name, m, steps)


@pytest.mark.timeout(240)
def test_int8_wire_trains_under_every_schedule():
    results = _world_results(2)["int8"]
    (gpipe_losses, gpipe_bytes), (losses, wire_bytes) = results["gpipe"], results["1f1b"]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    # the same hops and the same int8 rounding: only the order of gradient sums differs
    assert losses == pytest.approx(gpipe_losses, rel=1e-4)
    assert wire_bytes == gpipe_bytes and wire_bytes[1] > 0


def test_schedule_config_and_registry():
    assert set(schedule.SCHEDULES) == set(config.SCHEDULES)
    assert schedule.DEFAULT_SCHEDULE in config.SCHEDULES
    assert load_config(None, ["model_pipeline.schedule=gpipe"]).model_pipeline.schedule == "gpipe"
    with pytest.raises(ConfigError, match=r"model_pipeline\.schedule: expected one of"):
        load_config(None, ["model_pipeline.schedule=pipedream"])
    with pytest.raises(ValueError, match="model_pipeline.schedule"):
        PipelineDriver(None, [], objective=None, num_microbatches=2, rpc_timeout=1.0,
                       schedule="zigzag")


def test_split_is_balanced_and_never_empty():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    assert [len(a) for a, _ in split(x, y, 4)] == [3, 3, 2, 2]
    assert [len(a) for a, _ in split(x, y, 12)] == [1] * 10
    assert torch.equal(torch.cat([b for _, b in split(x, y, 7)]), y)
