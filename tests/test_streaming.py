"""Streaming DiLoCo (distqat.streaming) on real gloo groups: replicas bit-identical after
every fragment's outer step, the algebra against a single-process twin, one fragment
equal bit for bit to the outer step as it was before streaming, and a restore mid-window
that puts every fragment back at one outer step."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from distqat.checkpoint import CheckpointWriter
from distqat.config import ConfigError, DilocoConfig, OptimConfig
from distqat.diloco import DiLoCo
from distqat.elastic.restore import load_state
from distqat.quant import wire
from distqat.streaming import StreamingDiLoCo, make_diloco, split_fragments, sync_points

from mp import run_ranks

NESTEROV = OptimConfig(name="sgd", lr=0.7, momentum=0.9, nesterov=True)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 5), nn.Linear(5, 3))


def _drift(model, rank, step):
    """One replica's inner step: a different, deterministic change per rank and step, and
    a forward in training mode that moves the norm statistics (float and int buffers)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model(torch.randn(4, 6, generator=g) + rank)


def _globals(diloco):
    return [g.clone() for g in diloco.global_params]


# ---------------------------------------------------------------------------- pure parts

def test_fragments_are_contiguous_nonempty_and_balanced():
    sizes = [100, 10, 100, 10, 100, 10, 100, 10]
    frags = split_fragments(sizes, 4)
    assert [i for f in frags for i in f] == list(range(8))
    assert [sum(sizes[i] for i in f) for f in frags] == [110, 110, 110, 110]
    assert split_fragments([5, 1000, 5], 3) == [[0], [1], [2]]  # one tensor each at least
    assert split_fragments(sizes, 1) == [list(range(8))]
    with pytest.raises(ConfigError, match="diloco.fragments"):
        split_fragments([3, 3], 3)


def test_sync_points_stagger_posts_and_applies_over_the_window():
    assert sync_points(100, 4, 1) == [(24, 25), (49, 50), (74, 75), (99, 100)]
    assert sync_points(10, 3, 0) == [(3, 3), (6, 6), (10, 10)]
    with pytest.raises(ConfigError, match="diloco.overlap_steps"):
        sync_points(8, 4, 2)


@pytest.mark.parametrize("fields, name", [
    ({"fragments": 0}, "diloco.fragments"), ({"fragments": 11}, "diloco.fragments"),
    ({"fragments": 5, "overlap_steps": 2}, "diloco.overlap_steps"),
    ({"fragments": 2, "overlap_steps": -1}, "diloco.overlap_steps"),
    ({"merge_alpha": 1.0}, "diloco.merge_alpha")])
def test_config_names_the_bad_field(fields, name):
    with pytest.raises(ConfigError, match=name):
        DilocoConfig(inner_steps=10, **fields)


def test_one_fragment_builds_plain_diloco():
    assert type(make_diloco(_model(), DilocoConfig(), None)) is DiLoCo
    built = make_diloco(_model(), DilocoConfig(fragments=2, inner_steps=4), None)
    assert isinstance(built, StreamingDiLoCo) and len(built.fragments) == 2


# ------------------------------------------- fragments: 1 is the old outer step, bit for bit

def _reference_outer_step(module, params, glob, opt, group, wire_format, chunk_size):
    """DiLoCo.outer_step as it was before streaming (commit 0bac7d2), kept verbatim in
    substance: blocking collectives, one after the other."""
    world, src = dist.get_world_size(group), dist.get_process_group_ranks(group)[0]

    def mean_fp32(flat):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        return flat.div_(world)

    with torch.no_grad():
        deltas = [g - p for g, p in zip(glob, params)]
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if wire_format == "fp32":
            flat = _flatten_dense_tensors(deltas + [b.detach() for b in buffers])
            averaged = _unflatten_dense_tensors(mean_fp32(flat), deltas + buffers)
            mean_deltas, mean_buffers = averaged[: len(deltas)], averaged[len(deltas):]
        else:
            mine = wire.encode(_flatten_dense_tensors(deltas), wire_format,
                               chunk_size=chunk_size if wire_format == "int8" else None)
            datas = [torch.empty_like(mine.data) for _ in range(world)]
            dist.all_gather(datas, mine.data, group=group)
            scales = [None] * world
            if mine.scale is not None:
                scales = [torch.empty_like(mine.scale) for _ in range(world)]
                dist.all_gather(scales, mine.scale, group=group)
            total = torch.zeros_like(_flatten_dense_tensors(deltas))
            for d, s in zip(datas, scales):
                total += wire.decode(wire.Encoded(mine.fmt, mine.shape, mine.dtype, d, s,
                                                  mine.chunk_size))
            mean_deltas = _unflatten_dense_tensors(total.div_(world), deltas)
            flat_buf = _flatten_dense_tensors([b.detach() for b in buffers])
            mean_buffers = _unflatten_dense_tensors(mean_fp32(flat_buf), buffers)
        for g, d in zip(glob, mean_deltas):
            g.grad = d.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, glob):
            p.copy_(g)
        for b, v in zip(buffers, mean_buffers):
            b.copy_(v)
        ints = [b for b in module.buffers() if not b.is_floating_point()]
        flat = _flatten_dense_tensors(ints)
        dist.broadcast(flat, src=src, group=group)
        for t, v in zip(ints, _unflatten_dense_tensors(flat, ints)):
            t.copy_(v)


def _one_fragment_vs_reference(rank, world, wire_format, rounds, inner):
    group = dist.new_group(list(range(world)))
    model = _model(seed=rank)
    cfg = DilocoConfig(outer_optim=NESTEROV, inner_steps=inner)
    new = make_diloco(model, cfg, group, wire_format=wire_format, chunk_size=16)
    new.broadcast_initial()
    twin = copy.deepcopy(model)
    params = list(twin.parameters())
    glob = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(glob, lr=NESTEROV.lr, momentum=NESTEROV.momentum, nesterov=True)
    # and streaming's own code path with one fragment, no overlap: the same numbers too
    solo_model = copy.deepcopy(model)
    solo = StreamingDiLoCo(solo_model, NESTEROV, group, inner_steps=inner, fragments=1,
                           overlap_steps=0, wire_format=wire_format, chunk_size=16)
    solo.broadcast_initial()
    mismatches = []
    for outer in range(rounds):
        for i in range(inner):
            for m, d in ((model, new), (twin, None), (solo_model, solo)):
                _drift(m, rank, outer * inner + i)
                if d is not None:
                    d.inner_step_done()
        new.outer_step()
        _reference_outer_step(twin, params, glob, opt, group, wire_format, 16)
        solo.outer_step()
        want = twin.state_dict()
        for name, got in list(model.state_dict().items()) + [
                (f"solo.{k}", v) for k, v in solo_model.state_dict().items()]:
            if not torch.equal(got, want[name.removeprefix("solo.")]):
                mismatches.append((outer, name))
        for a, b, c in zip(new.global_params, glob, solo.global_params):
            if not (torch.equal(a, b) and torch.equal(c, b)):
                mismatches.append((outer, "global"))
        momentum = [opt.state[g]["momentum_buffer"] for g in glob]
        for d in (new, solo):
            if not all(torch.equal(d.outer_optimizer.state[g]["momentum_buffer"], m)
                       for g, m in zip(d.global_params, momentum)):
                mismatches.append((outer, "momentum"))
    return mismatches


def _one_fragment_both_wires(rank, world, rounds, inner):
    return {fmt: _one_fragment_vs_reference(rank, world, fmt, rounds, inner)
            for fmt in ("fp32", "int8")}


@pytest.mark.timeout(120)
def test_one_fragment_is_the_old_outer_step_bit_for_bit():
    for by_wire in run_ranks(_one_fragment_both_wires, 2, 3, 4):  # one spawn, both wires
        assert by_wire == {"fp32": [], "int8": []}


# ------------------------------- replicas identical after every fragment's outer step

def _stream(rank, world, fragments, inner, overlap, alpha, windows, wire_format):
    """Train ``windows`` windows; after every inner step record which fragments have
    stepped, the global copies, the local parameters and the buffers."""
    group = dist.new_group(list(range(world)))
    model = _model(seed=rank)  # different on purpose: the broadcast must fix it
    diloco = StreamingDiLoCo(model, NESTEROV, group, inner_steps=inner, fragments=fragments,
                             overlap_steps=overlap, merge_alpha=alpha,
                             wire_format=wire_format, chunk_size=16)
    diloco.broadcast_initial()
    trace = []
    for window in range(windows):
        for i in range(inner):
            _drift(model, rank, window * inner + i)
            diloco.inner_step_done()
            if i == inner - 1:
                stats = diloco.outer_step()
                assert stats.outer_step == window + 1 and stats.bytes_sent > 0
            trace.append({"steps": diloco.fragment_outer_steps(), "global": _globals(diloco),
                          "local": [p.detach().clone() for p in diloco.params],
                          "buffers": [b.clone() for b in model.buffers()]})
    return diloco.fragments, trace


def _twin(world, fragments, inner, overlap, alpha, windows):
    """The same algebra in one process: replicas as copies, averaging as a mean, each
    fragment's pseudo-gradient taken at its post step and applied at its apply step."""
    replicas = [copy.deepcopy(_model(seed=0)) for _ in range(world)]
    params = [list(m.parameters()) for m in replicas]
    glob = [p.detach().clone() for p in params[0]]
    opt = torch.optim.SGD(glob, lr=NESTEROV.lr, momentum=NESTEROV.momentum, nesterov=True)
    frags = split_fragments([g.numel() for g in glob], fragments)
    points = sync_points(inner, fragments, overlap)
    trace, pending = [], {}

    def post(f):
        pending[f] = {i: torch.stack([glob[i] - ps[i].detach() for ps in params]).mean(0)
                      for i in frags[f]}

    def apply(f):
        for i, d in pending.pop(f).items():
            glob[i].grad = d
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for ps in params:
                for i in frags[f]:
                    ps[i].mul_(alpha).add_(glob[i], alpha=1 - alpha)

    for window in range(windows):
        for pos in range(1, inner + 1):
            for rank, m in enumerate(replicas):
                _drift(m, rank, window * inner + pos - 1)
            for f, (_, a_at) in enumerate(points):
                if a_at == pos and f in pending:
                    apply(f)
            for f, (p_at, a_at) in enumerate(points):
                if p_at == pos:
                    post(f)
                    if a_at == pos:  # no overlap
                        apply(f)
            trace.append([g.clone() for g in glob])
    return trace


CASES = ((0.0, "fp32"), (0.5, "fp32"), (0.0, "int8"))  # (merge_alpha, wire format)


def _stream_cases(rank, world, fragments, inner, overlap, windows):
    return [_stream(rank, world, fragments, inner, overlap, alpha, windows, fmt)
            for alpha, fmt in CASES]


@pytest.mark.timeout(180)
def test_replicas_bit_identical_after_every_fragment_outer_step():
    fragments, inner, overlap, windows = 3, 6, 1, 2
    results = run_ranks(_stream_cases, 2, fragments, inner, overlap, windows)  # one spawn
    for case, (alpha, wire_format) in enumerate(CASES):
        _check_case(results[0][case], results[1][case], alpha, wire_format, fragments, inner,
                    overlap, windows)


def _check_case(r0, r1, alpha, wire_format, fragments, inner, overlap, windows):
    (frags, t0), (_, t1) = r0, r1
    twin = _twin(2, fragments, inner, overlap, alpha, windows)
    points = sync_points(inner, fragments, overlap)
    for step, (a, b) in enumerate(zip(t0, t1)):
        pos = step % inner + 1
        window = step // inner
        # the schedule: fragment f has stepped once its apply step of this window is past
        assert a["steps"] == [window + (pos >= end) for _, end in points], (step, a["steps"])
        assert a["steps"] == b["steps"]
        for g0, g1 in zip(a["global"], b["global"]):
            assert torch.equal(g0, g1), f"global copies differ after inner step {step + 1}"
        if wire_format == "fp32":
            for got, want in zip(a["global"], twin[step]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for f, (_, end) in enumerate(points):
            if end == pos and alpha == 0.0:  # just stepped: the local fragment is global
                for i in frags[f]:
                    assert torch.equal(a["local"][i], a["global"][i])
                    assert torch.equal(b["local"][i], b["global"][i])
        if pos == inner:  # window end: the buffers were averaged (float) / broadcast (int)
            for x, y in zip(a["buffers"], b["buffers"]):
                assert torch.equal(x, y), f"buffers differ at the end of window {window + 1}"
    if alpha == 0.5:  # mixing keeps part of each replica's own steps: locals differ
        assert not all(torch.equal(x, y) for x, y in zip(t0[-1]["local"], t1[-1]["local"]))


# ----------------------------------------- checkpoint, kill mid-window, restore, resume

def _restore_mid_window(rank, world, folder, inner, fragments, kill_after):
    group = dist.new_group(list(range(world)))
    cfg = DilocoConfig(outer_optim=NESTEROV, inner_steps=inner, fragments=fragments)
    model = _model(seed=rank)
    diloco = make_diloco(model, cfg, group)
    diloco.broadcast_initial()
    writer = CheckpointWriter([f"{folder}/rank{rank}"], stage=0, keep=2)
    for i in range(inner):  # window 1, checkpointed at its end as StageHost does
        _drift(model, rank, i)
        diloco.inner_step_done()
    writer.submit(diloco.outer_step().outer_step, diloco.state())
    writer.close(timeout=60)
    for i in range(kill_after):  # window 2, cut short with a fragment's average in flight
        _drift(model, rank, inner + i)
        diloco.inner_step_done()
    mid = {"steps": diloco.fragment_outer_steps(), "in_flight": sorted(diloco.in_flight)}
    with pytest.raises(RuntimeError, match="mid-window"):
        diloco.state()
    # "restart": fresh objects from the source's checkpoint (rank 0's), as restore.exchange
    # hands one stage state to every new host of the stage
    state = load_state([f"{folder}/rank0"], 0, 1)
    model = _model(seed=10 + rank)
    diloco = make_diloco(model, cfg, group)
    diloco.load_state(state)
    resumed = {"steps": diloco.fragment_outer_steps(),
               "params": [p.detach().clone() for p in diloco.params],
               "saved": [g.clone() for g in state["global_params"]]}
    plain = DiLoCo(_model(seed=20), NESTEROV, None)  # the format is plain DiLoCo's
    plain.load_state(state)
    resumed["plain_equal"] = all(torch.equal(a, b) for a, b in zip(plain.params, diloco.params))
    ends = []
    for i in range(inner):  # window 2 again, whole
        _drift(model, rank, inner + i)
        diloco.inner_step_done()
        if i == inner - 1:
            diloco.outer_step()
        ends.append(_globals(diloco))
    return mid, resumed, ends, diloco.fragment_outer_steps()


@pytest.mark.timeout(120)
def test_restore_mid_window_resumes_every_fragment_at_one_outer_step(tmp_path):
    inner, fragments, kill_after = 8, 4, 5  # applies at 2,4,6,8; posts at 1,3,5,7
    results = run_ranks(_restore_mid_window, 2, str(tmp_path), inner, fragments, kill_after)
    for mid, resumed, _, final in results:
        assert mid["steps"] == [2, 2, 1, 1] and mid["in_flight"] == [2]
        assert resumed["steps"] == [1, 1, 1, 1]  # every fragment back at outer step 1
        for p, g in zip(resumed["params"], resumed["saved"]):
            assert torch.equal(p, g)  # local = the checkpoint's global copy, every fragment
        assert resumed["plain_equal"]
        assert final == [2, 2, 2, 2]
    (_, r0, e0, _), (_, r1, e1, _) = results
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    for step, (a, b) in enumerate(zip(e0, e1)):
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"replicas differ after resumed inner step {step + 1}"
