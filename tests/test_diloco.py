"""DiLoCo's outer step on real gloo groups, against its single-process twin."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distqat.config import OptimConfig
from distqat.diloco import DiLoCo

from mp import run_ranks


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.GroupNorm(1, 5), nn.Linear(5, 3))


def _local_drift(model, rank, outer):
    """A replica's inner steps: a different, deterministic change per rank and round."""
    g = torch.Generator().manual_seed(1000 * outer + rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def _drifted(world):
    """Each replica's parameters after one round of local drift from the common start."""
    drifted = []
    for rank in range(world):
        m = _model(seed=0)
        _local_drift(m, rank, 0)
        drifted.append(dict(m.named_parameters()))
    return drifted


def _replica(rank, world, outer_cfg, rounds, wire_format="fp32"):
    model = _model(seed=rank)  # different on purpose: the broadcast must fix it
    group = dist.new_group(list(range(world)))
    diloco = DiLoCo(model, outer_cfg, group, wire_format=wire_format, chunk_size=16)
    diloco.broadcast_initial()
    history = []
    for outer in range(rounds):
        _local_drift(model, rank, outer)
        stats = diloco.outer_step()
        history.append({k: v.clone() for k, v in model.state_dict().items()})
    return history, stats.bytes_sent


def _twin(world, outer_cfg, rounds):
    """The same algebra in one process: replicas as copies, averaging as a mean."""
    start = _model(seed=0)
    replicas = [copy.deepcopy(start) for _ in range(world)]
    ref = copy.deepcopy(start)
    glob = [p.detach().clone() for p in ref.parameters()]
    opt = torch.optim.SGD(glob, lr=outer_cfg.lr, momentum=outer_cfg.momentum,
                          nesterov=outer_cfg.nesterov)
    history = []
    for outer in range(rounds):
        for rank, m in enumerate(replicas):
            _local_drift(m, rank, outer)
        locals_ = [list(m.parameters()) for m in replicas]
        for i, g in enumerate(glob):
            g.grad = torch.stack([g - ps[i].detach() for ps in locals_]).mean(0)
        opt.step()
        with torch.no_grad():
            for m in replicas:
                for p, g in zip(m.parameters(), glob):
                    p.copy_(g)
        history.append({k: v.clone() for k, v in replicas[0].state_dict().items()})
    return history


@pytest.mark.timeout(180)
def test_outer_sgd_lr1_no_momentum_is_plain_averaging():
    cfg = OptimConfig(name="sgd", lr=1.0, momentum=0.0, nesterov=False)
    world = 3
    results = run_ranks(_replica, world, cfg, 1)
    # expected: the mean of the replicas after their local drift from the common start
    drifted = _drifted(world)
    after = [h[0] for h, _ in results]
    for name in drifted[0]:
        mean = torch.stack([d[name].detach() for d in drifted]).mean(0)
        torch.testing.assert_close(after[0][name], mean, rtol=0, atol=1e-6)
    for other in after[1:]:
        for name, value in after[0].items():
            assert torch.equal(value, other[name]), f"{name} differs between replicas"


@pytest.mark.timeout(180)
def test_nesterov_outer_steps_match_single_process_twin_and_replicas_identical():
    cfg = OptimConfig(name="sgd", lr=0.7, momentum=0.9, nesterov=True)
    world, rounds = 2, 3
    results = run_ranks(_replica, world, cfg, rounds)
    twin = _twin(world, cfg, rounds)
    n_params = sum(p.numel() for p in _model().parameters())
    n_buffers = sum(b.numel() for b in _model().buffers())
    for (history, nbytes) in results:
        assert nbytes == 4 * (n_params + n_buffers)
        for got, want in zip(history, twin):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)
    for r0, r1 in zip(results[0][0], results[1][0]):
        for name in r0:
            assert torch.equal(r0[name], r1[name]), f"{name} differs between replicas"


def test_single_replica_lr1_outer_step_keeps_local_params():
    """With one replica and lr 1, no momentum, the outer step is the identity up to one
    rounding of g - (g - p): the gradient-equivalence test relies on it."""
    model = _model()
    diloco = DiLoCo(model, OptimConfig(name="sgd", lr=1.0))
    _local_drift(model, 0, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diloco.outer_step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-7)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("wire_format, tol, ratio", [("bf16", 2e-2, 0.5), ("int8", 2e-2, 0.3)])
def test_compressed_pseudo_gradients_stay_close_identical_and_smaller(wire_format, tol, ratio):
    cfg = OptimConfig(name="sgd", lr=0.7, momentum=0.9, nesterov=True)
    world, rounds = 3, 2
    results = run_ranks(_replica, world, cfg, rounds, wire_format)
    twin = _twin(world, cfg, rounds)
    n_params = sum(p.numel() for p in _model().parameters())
    n_buffers = sum(b.numel() for b in _model().buffers())
    for history, nbytes in results:
        # the deltas go compressed; the (few) float buffers go as fp32
        assert nbytes - 4 * n_buffers <= ratio * 4 * n_params + 4 * (n_params // 16 + 1)
        for got, want in zip(history, twin):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol)
    for r in results[1:]:
        for h0, h in zip(results[0][0], r[0]):
            for name in h0:
                assert torch.equal(h0[name], h[name]), f"{name} differs between replicas"


def _drifted_replica(rank, world, wire_format, outer: OptimConfig):
    """A replica's model and DiLoCo (int8 chunks of 16) after one window of local drift."""
    model = _model(seed=0)
    group = dist.new_group(list(range(world)))
    diloco = DiLoCo(model, outer, group, wire_format=wire_format, chunk_size=16)
    diloco.broadcast_initial()
    _local_drift(model, rank, 0)
    return model, diloco


def _weighted_replica(rank, world, wire_format, samples):
    """One outer step (outer SGD lr 1, no momentum: the result is the averaged model)
    with the replicas weighted by ``samples`` (None: unweighted, today's call)."""
    model, diloco = _drifted_replica(rank, world, wire_format,
                                     OptimConfig(name="sgd", lr=1.0, momentum=0.0, nesterov=False))
    if samples is not None:
        diloco.set_weights(samples)
    diloco.outer_step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.timeout(180)
def test_weighted_outer_step_is_the_sample_weighted_mean():
    world, samples = 3, [48, 12, 36]
    results = run_ranks(_weighted_replica, world, "fp32", samples)
    drifted = _drifted(world)
    total = sum(samples)
    for name in drifted[0]:
        want = sum(w / total * d[name].detach() for w, d in zip(samples, drifted))
        torch.testing.assert_close(results[0][name], want, rtol=0, atol=1e-6)
        plain = torch.stack([d[name].detach() for d in drifted]).mean(0)
        assert not torch.allclose(want, plain, atol=1e-4)  # the weights made a difference
    for other in results[1:]:
        for name, value in results[0].items():
            assert torch.equal(value, other[name]), f"{name} differs between replicas"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("wire_format", ["fp32", "int8"])
def test_equal_weights_give_the_unweighted_mean_bit_for_bit(wire_format):
    world = 3
    unweighted = run_ranks(_weighted_replica, world, wire_format, None)
    equal = run_ranks(_weighted_replica, world, wire_format, [20, 20, 20])
    for got, want in zip(equal, unweighted):
        for name in want:
            assert torch.equal(got[name], want[name]), name


@pytest.mark.timeout(180)
def test_weighted_int8_mean_is_close_to_the_weighted_fp32_mean():
    samples = [10, 30]
    fp32 = run_ranks(_weighted_replica, 2, "fp32", samples)
    int8 = run_ranks(_weighted_replica, 2, "int8", samples)
    for name in fp32[0]:
        torch.testing.assert_close(int8[0][name], fp32[0][name], rtol=2e-2, atol=2e-2)
        assert torch.equal(int8[0][name], int8[1][name])


def test_weights_are_checked():
    diloco = DiLoCo(_model(), OptimConfig(name="sgd", lr=1.0))
    diloco.set_weights([5])  # one replica: its own weight is the whole
    assert diloco.factors == [1.0]
    with pytest.raises(ValueError, match="sample counts"):
        diloco.set_weights([1, 2])


def _chunked_vs_whole(rank, world, wire_format):
    """The same outer step with the compressed all-gather in one piece and in pieces of 7
    bytes (payloads span many pieces); the models after it, and the pieces posted."""
    import distqat.diloco as diloco_mod

    out = {}
    for name, piece in (("whole", 1 << 30), ("chunked", 7)):
        diloco_mod.ALLGATHER_CHUNK_BYTES = piece
        model, diloco = _drifted_replica(rank, world, wire_format,
                                         OptimConfig(name="sgd", lr=0.7, momentum=0.9, nesterov=True))
        sync = diloco.start_sync(range(len(diloco.params)), with_buffers=True)
        diloco.finish_sync(sync)
        out[name] = ({k: v.clone() for k, v in model.state_dict().items()}, len(sync.works))
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("wire_format", ["int8", "bf16"])
def test_chunked_all_gather_gives_the_one_piece_mean_bit_for_bit(wire_format):
    """Two replicas: the payload goes in pieces (module docstring), the mean unchanged."""
    results = run_ranks(_chunked_vs_whole, 2, wire_format)
    for res in results:
        (whole, n_whole), (chunked, n_chunked) = res["whole"], res["chunked"]
        assert n_chunked > n_whole + 4  # the payload really went in several pieces
        for name in whole:
            assert torch.equal(chunked[name], whole[name]), name
    for name in results[0]["chunked"][0]:
        assert torch.equal(results[0]["chunked"][0][name], results[1]["chunked"][0][name])


def _probed(rank, world, wire_format):
    """A 300k-parameter stage: its pieces before and after probe_link, and the works one
    outer step posts with them."""
    torch.manual_seed(0)
    model = nn.Linear(600, 500)
    group = dist.new_group(list(range(world)))
    diloco = DiLoCo(model, OptimConfig(name="sgd", lr=0.7, momentum=0.9, nesterov=True), group,
                    wire_format=wire_format)
    diloco.broadcast_initial()
    before = diloco.piece_bytes
    works = []
    for probe in (False, True):
        if probe:
            diloco.probe_link()
        _local_drift(model, rank, 0)
        sync = diloco.start_sync(range(len(diloco.params)), with_buffers=True)
        diloco.finish_sync(sync)
        works.append(len(sync.works))
    return before, diloco.piece_bytes, works, model.weight.detach().clone()


@pytest.mark.timeout(180)
def test_probe_link_sizes_the_pieces_to_the_link_alike_on_every_rank():
    """Loopback is fast: the probe picks pieces above 64 kB (about a MB unless the machine
    is busy), the same on both ranks, and the 300 kB int8 payload goes in as many pieces
    of that size (5 of 64 kB before; the scales in one more); fp32 (one all-reduce) has no
    pieces to size."""
    import math

    from distqat.diloco import ALLGATHER_CHUNK_BYTES

    results = run_ranks(_probed, 2, "int8")
    (before, after, works, weight), (_, after_1, works_1, weight_1) = results
    assert before == ALLGATHER_CHUNK_BYTES and after == after_1 > ALLGATHER_CHUNK_BYTES
    assert works == works_1 == [5 + 1, math.ceil(300_000 / after) + 1]
    assert torch.equal(weight, weight_1)  # the replicas stay bit-identical
    fp32 = run_ranks(_probed, 2, "fp32")
    assert fp32[0][1] == ALLGATHER_CHUNK_BYTES and fp32[0][2] == [1, 1]
