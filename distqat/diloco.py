"""DiLoCo's outer step for one stage replica (Douillard et al., 2023).

Each stage host keeps a copy of the stage's *global* parameters (the value they had after
the last outer step) and an outer optimizer over that copy. Every ``inner_steps`` inner
steps the replicas of a stage, inside that stage's own process group:

    delta_i  = global - local_i                 (the pseudo-gradient of replica i)
    delta    = mean_i delta_i                   (one collective over one flat tensor)
    global   = outer_optimizer(global, delta)   (SGD + Nesterov momentum by default)
    local_i  = global                           (every replica restarts from it)

Invariant: after :meth:`DiLoCo.outer_step` every replica of the stage holds bit-identical
parameters. It holds because all replicas start from the same global copy (the
constructor's broadcast), every rank computes the mean from the same bytes, and the outer
optimizer is deterministic. Floating-point buffers (norm statistics, quantizer ranges)
have no outer optimizer: they are averaged plainly. Integer buffers (step counters,
zero-points) cannot be averaged: they are taken from the group's first rank. With outer
SGD at lr 1 and no momentum the outer step is exactly plain averaging of the replicas.

Compressed pseudo-gradients (``wire_format`` ``bf16``, or ``int8`` with one scale per
``chunk_size`` elements). The mean is formed by an all-gather of the compressed payloads,
every rank decoding all of them and averaging in float32, in rank order. Why not an
all-reduce: a sum of int8 overflows, reducing in a wider type would put the wider type on
the wire (the very bytes we set out to save), and summing in bf16 would round at every hop.
Cost per rank for N elements and n replicas: a ring all-reduce of fp32 sends
8N(n-1)/n bytes, an all-gather of int8 N(n-1), of bf16 2N(n-1): int8 is cheaper below 8
replicas, bf16 below 4, which covers the few replicas per stage DiLoCo is made for.
Decoding the same payloads in the same order keeps the replicas bit-identical.

Between exactly two replicas the all-gather goes in pieces of :data:`ALLGATHER_CHUNK_BYTES`
(all posted at once, waited in order), each piece landing in its slice of every rank's
result, so the bytes are those of one all-gather. Why: between two ranks gloo's
all-gather is one ``send`` and one ``recv`` of the whole payload on one connection at
once, and over a throttled 10 Mbit/s link 0.81 MB took 0.66-1.21 s where the link needs
0.68 s; cut into 16 pieces of 51 kB it took 0.68-0.78 s (BENCHMARKS.md, "Planning past one
machine"). With three or more the ring uses each connection one way and ran at the link's
speed in one piece, and each piece pays the ring's n-1 latencies again: there it stays one
piece. Two replicas cut a payload into at most :data:`ALLGATHER_MAX_PIECES` (larger
pieces beyond 4 MB): on a 50 ms link 1840 pieces of a 120 MB model would add 90 s; 64
add ~3 s. On a fast link a 64 kB piece is over in half a millisecond and each piece's own
cost adds up (13 pieces took 1.82x the link's time at 1 Gbit/s; 2 pieces of ~3.4 ms,
0.99x), so :meth:`DiLoCo.probe_link` sizes the pieces once per group to about
:data:`ALLGATHER_PIECE_SECONDS` of the link, never below 64 kB: 10 and 100 Mbit/s keep 64 kB.

``bytes_sent`` counts the payload a rank hands to its collectives (its own contribution; 0
for a replica alone).

Replicas that processed different numbers of samples (``diloco.balance``: batch sizes
matched to each replica's speed) are averaged weighted by those samples, w_i of W in all:

    delta = sum_i (w_i / W) delta_i = (1/n) sum_i f_i delta_i,   f_i = n w_i / W

Each rank scales its own pseudo-gradient by f_i before the sum (fp32), or every rank
scales each decoded payload by its f_i (compressed), and the sum is divided by n as
before. With equal weights n w / (n w) is exactly 1.0 in floating point, and multiplying
by 1.0 changes no bit, so the mean is today's, bit for bit; every rank computes the same f_i from
the same integers, so the replicas stay bit-identical. Buffers are averaged plainly.
Weights are set per outer step by :meth:`DiLoCo.set_weights` (samples, by group rank).

An outer step is two halves, :meth:`DiLoCo.start_sync` (pseudo-gradients computed, the
collectives posted with ``async_op``) and :meth:`DiLoCo.finish_sync` (wait, outer optimizer,
local copy), over any subset of the parameters. Plain DiLoCo runs both halves back to back
over all of them; streaming DiLoCo (:mod:`distqat.streaming`) runs them per fragment, inner
steps apart. Posting and waiting at once gives the very bytes of a blocking collective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import optim
from .config import OptimConfig
from .quant import wire

ALLGATHER_CHUNK_BYTES = 64 * 1024  # per piece of a 2-rank compressed all-gather (see above)
ALLGATHER_MAX_PIECES = 64  # ... and at most this many pieces per payload
ALLGATHER_PIECE_SECONDS = 0.004  # ... and larger pieces on fast links: this long each
PROBE_BYTES = 256 * 1024  # all-gathered once by probe_link to find the link's speed


def piece_bytes(rate: float) -> int:
    """A 2-rank all-gather's piece for a link of ``rate`` payload bytes/s: about
    :data:`ALLGATHER_PIECE_SECONDS` of it, at least :data:`ALLGATHER_CHUNK_BYTES`."""
    return max(ALLGATHER_CHUNK_BYTES, int(rate * ALLGATHER_PIECE_SECONDS))


def _flat_copy(tensors: List[torch.Tensor]) -> torch.Tensor:
    """The tensors in one new flat tensor. ``_flatten_dense_tensors`` returns a *view* of a
    lone tensor: a collective still running in the background would then write into a
    live parameter or buffer while training goes on."""
    flat = _flatten_dense_tensors(tensors)
    return flat.clone() if len(tensors) == 1 else flat


@dataclass
class OuterStepStats:
    outer_step: int
    seconds: float
    bytes_sent: int
    pseudo_grad_norm: float
    wait_seconds: float = 0.0  # of ``seconds``, blocked waiting for collectives


def build_optimizer(params, cfg: OptimConfig) -> optim.Optimizer:
    """The optimizer named by ``cfg`` (adamw, adam, sgd) over params or param groups
    (:mod:`distqat.optim`: torch.optim's arithmetic without its import of the compiler)."""
    if cfg.name == "adamw":
        return optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                           weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas),
                          weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


class DiLoCo:
    """Outer-step state of one replica of one stage, averaging in ``group`` (None: this
    replica alone). ``after_sync`` runs after the parameters and buffers are replaced
    (e.g. to recompute quantizer scales from the averaged ranges)."""

    def __init__(self, module: nn.Module, outer_cfg: OptimConfig,
                 group: Optional[dist.ProcessGroup] = None, *, wire_format: str = "fp32",
                 chunk_size: int = 4096, after_sync: Optional[Callable[[], None]] = None):
        if wire_format not in wire.FORMATS:
            raise ValueError(f"wire_format must be one of {wire.FORMATS}, got {wire_format!r}")
        self.module = module
        self.group = group
        self.src = dist.get_process_group_ranks(group)[0] if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        self.wire_format = wire_format
        self.chunk_size = chunk_size
        self.after_sync = after_sync
        self.params: List[nn.Parameter] = [p for p in module.parameters() if p.requires_grad]
        self.global_params = [p.detach().clone() for p in self.params]
        self.outer_optimizer = build_optimizer(self.global_params, outer_cfg)
        self.outer_step_count = 0
        self.factors: Optional[List[float]] = None  # f_i by group rank; None: all 1.0
        # a gloo group (a stage with a CPU member) cannot take CUDA tensors everywhere:
        # the collectives then run on CPU copies, and the results come back to the device
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.via_cpu = (group is not None and self.device.type != "cpu"
                        and dist.get_backend(group) == "gloo")
        self.my_index = dist.get_group_rank(group, dist.get_rank()) if group is not None else 0
        self.piece_bytes = ALLGATHER_CHUNK_BYTES  # a 2-rank all-gather's pieces (probe_link)

    def set_weights(self, samples: Optional[Sequence[int]]) -> None:
        """Weight the next averages by ``samples`` (one count per group rank, in group
        rank order; None: equal). See the module docstring for the algebra."""
        if samples is None:
            self.factors = None
            return
        if len(samples) != self.world or min(samples) < 0 or sum(samples) <= 0:
            raise ValueError(f"expected {self.world} sample counts >= 0 with a positive "
                             f"sum, got {list(samples)}")
        total = sum(samples)
        self.factors = [self.world * w / total for w in samples]

    def _float_buffers(self) -> List[torch.Tensor]:
        # read each time: quantizers size some buffers lazily, on their first batch
        return [b for b in self.module.buffers() if b.is_floating_point()]

    def _int_buffers(self) -> List[torch.Tensor]:
        return [b for b in self.module.buffers() if not b.is_floating_point()]

    def _wire(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` where the group's collectives can take it (a CPU copy on gloo)."""
        return flat.cpu() if self.via_cpu else flat

    def _broadcast(self, tensors: List[torch.Tensor]) -> None:
        if self.group is None or not tensors:
            return
        flat = self._wire(_flatten_dense_tensors(tensors))
        dist.broadcast(flat, src=self.src, group=self.group)
        for t, v in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            t.copy_(v)

    @torch.no_grad()
    def broadcast_initial(self) -> None:
        """Every replica starts from the first rank's parameters and buffers."""
        self._broadcast([p.data for p in self.params] + self._float_buffers())
        self._broadcast(self._int_buffers())
        for g, p in zip(self.global_params, self.params):
            g.copy_(p)

    def state(self) -> Dict[str, Any]:
        """What a checkpoint keeps of this stage: the global copy, the outer optimizer's
        momentum, the buffers and the step count (live tensors: the caller copies them)."""
        return {"outer_step": self.outer_step_count, "global_params": self.global_params,
                "buffers": dict(self.module.named_buffers()),
                "outer_optim": self.outer_optimizer.state_dict()}

    @torch.no_grad()
    def load_state(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state` (a checkpoint): local and global parameters both
        become the saved global ones."""
        saved = state["global_params"]
        if len(saved) != len(self.params) or any(
                a.shape != b.shape for a, b in zip(saved, self.params)):
            raise ValueError("the checkpoint's parameters do not match the stage's model "
                             "(was the model config changed?)")
        for p, g, v in zip(self.params, self.global_params, saved):
            p.copy_(v)
            g.copy_(v)
        # through load_state_dict: modules size lazy buffers and refresh their mirrors
        self.module.load_state_dict(state["buffers"], strict=False)
        self.outer_optimizer.load_state_dict(state["outer_optim"])
        self.outer_step_count = state["outer_step"]

    def _post_mean_fp32(self, flat: torch.Tensor, works: list,
                        weighted: Optional[int] = None) -> Callable[[], torch.Tensor]:
        """Post the sum of ``flat`` over the group (in place); the returned function, called
        once ``works`` are done, turns it into the mean (sample-weighted over its first
        ``weighted`` elements, the pseudo-gradients)."""
        if self.group is None:
            return lambda: flat
        if weighted is not None and self.factors is not None:
            flat[:weighted].mul_(self.factors[self.my_index])
        sent = self._wire(flat)
        works.append(dist.all_reduce(sent, op=dist.ReduceOp.SUM, group=self.group,
                                     async_op=True))
        return lambda: sent.to(self.device).div_(self.world)

    @torch.no_grad()
    def probe_link(self) -> None:
        """Size a 2-rank compressed all-gather's pieces to the link (module docstring):
        after a barrier, :data:`PROBE_BYTES` all-gathered in one piece; the slower rank's
        time, all-reduced, gives every rank the same ``piece_bytes``. A collective: every
        rank of the group calls it; nothing to do for fp32, one replica, or three and more."""
        if self.group is None or self.world != 2 or self.wire_format == "fp32":
            return
        probe = self._wire(torch.zeros(PROBE_BYTES, dtype=torch.uint8, device=self.device))
        dist.barrier(group=self.group)
        start = time.perf_counter()
        dist.all_gather([torch.empty_like(probe) for _ in range(2)], probe, group=self.group)
        took = self._wire(torch.tensor([time.perf_counter() - start], dtype=torch.float64,
                                       device=self.device))
        dist.all_reduce(took, op=dist.ReduceOp.MAX, group=self.group)
        self.piece_bytes = piece_bytes(PROBE_BYTES / max(took.item(), 1e-9))

    def _post_all_gather(self, tensor: torch.Tensor, works: list) -> List[torch.Tensor]:
        """Every rank's ``tensor`` (flat), by group rank, all-gathered now (``works`` gets
        the collectives in order): between two ranks in pieces of ``piece_bytes``
        (at most :data:`ALLGATHER_MAX_PIECES`), else in one (module docstring). The
        returned tensors are complete once those are done."""
        outs = [torch.empty_like(tensor) for _ in range(self.world)]
        step = max(1, self.piece_bytes // tensor.element_size(),
                   -(-tensor.numel() // ALLGATHER_MAX_PIECES))
        if self.world != 2:
            step = max(1, tensor.numel())
        for start in range(0, tensor.numel(), step):
            piece = slice(start, start + step)
            works.append(dist.all_gather([o[piece] for o in outs], tensor[piece],
                                         group=self.group, async_op=True))
        return outs

    def _post_mean_compressed(self, flat: torch.Tensor,
                              works: list) -> Tuple[Callable[[], torch.Tensor], int]:
        chunk = self.chunk_size if self.wire_format == "int8" else None
        mine = wire.encode(self._wire(flat), self.wire_format, chunk_size=chunk)
        payloads = [mine]
        if self.group is not None:
            datas = self._post_all_gather(mine.data, works)
            scales = [None] * self.world
            if mine.scale is not None:
                scales = self._post_all_gather(mine.scale, works)
            payloads = [wire.Encoded(mine.fmt, mine.shape, mine.dtype, d, s, mine.chunk_size)
                        for d, s in zip(datas, scales)]

        factors = self.factors if len(payloads) > 1 else None

        def mean() -> torch.Tensor:
            total = torch.zeros_like(flat)
            for i, payload in enumerate(payloads):  # rank order on every rank: identical sums
                decoded = wire.decode(payload).to(self.device)
                total += decoded if factors is None else decoded.mul_(factors[i])
            return total.div_(len(payloads))
        return mean, wire.nbytes(mine)

    def _post_broadcast(self, tensors: List[torch.Tensor], works: list) -> Callable[[], None]:
        if self.group is None or not tensors:
            return lambda: None
        flat = self._wire(_flat_copy(tensors))
        works.append(dist.broadcast(flat, src=self.src, group=self.group, async_op=True))

        def install() -> None:
            for t, v in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                t.copy_(v)
        return install

    @torch.no_grad()
    def start_sync(self, index: Sequence[int], with_buffers: bool) -> "Sync":
        """Compute the pseudo-gradients of ``self.params[i] for i in index`` now and post the
        collectives that average them (with the buffers too if ``with_buffers``); nothing
        waits. Every rank of the group must start the same syncs in the same order."""
        deltas = [self.global_params[i] - self.params[i] for i in index]
        buffers = self._float_buffers() if with_buffers else []
        works: list = []
        if self.wire_format == "fp32":
            # one flat tensor: one collective per sync, whatever the layer count
            flat = _flat_copy(deltas + [b.detach() for b in buffers])
            nbytes = flat.numel() * flat.element_size()
            mean = self._post_mean_fp32(flat, works, weighted=sum(d.numel() for d in deltas))

            def means():
                averaged = _unflatten_dense_tensors(mean(), deltas + buffers)
                return averaged[: len(deltas)], averaged[len(deltas):]
        else:
            mean_d, nbytes = self._post_mean_compressed(_flat_copy(deltas), works)
            mean_b = None
            if buffers:
                flat_buf = _flat_copy([b.detach() for b in buffers])
                nbytes += flat_buf.numel() * flat_buf.element_size()
                mean_b = self._post_mean_fp32(flat_buf, works)

            def means():
                mean_buffers = _unflatten_dense_tensors(mean_b(), buffers) if mean_b else []
                return _unflatten_dense_tensors(mean_d(), deltas), mean_buffers
        install_ints = self._post_broadcast(self._int_buffers() if with_buffers else [], works)
        if self.world == 1:  # a replica alone sends nothing
            nbytes = 0
        return Sync(list(index), works, means, install_ints, buffers, with_buffers, nbytes)

    @torch.no_grad()
    def finish_sync(self, sync: "Sync", alpha: float = 0.0) -> Tuple[float, float]:
        """Wait for ``sync``'s collectives, apply the outer optimizer to its parameters and
        set the local ones to ``alpha * local + (1 - alpha) * global`` (alpha 0: the global
        copy itself, exactly). Returns (seconds blocked waiting, pseudo-gradient norm)."""
        t0 = time.perf_counter()
        for work in sync.works:
            work.wait()
        waited = time.perf_counter() - t0
        mean_deltas, mean_buffers = sync.means()
        norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(d) for d in mean_deltas])).item() if mean_deltas else 0.0
        for i, d in zip(sync.index, mean_deltas):
            self.global_params[i].grad = d.clone()
        # parameters without a gradient are skipped by the optimizer (momentum untouched):
        # one optimizer serves every fragment, and its state is the same whatever the split
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        for i in sync.index:
            if alpha == 0.0:
                self.params[i].copy_(self.global_params[i])
            else:
                self.params[i].lerp_(self.global_params[i], 1.0 - alpha)
        for b, v in zip(sync.buffers, mean_buffers):
            b.copy_(v)
        sync.install_ints()
        if sync.with_buffers and self.after_sync is not None:
            self.after_sync()
        return waited, norm

    def inner_step_done(self) -> None:
        """Called after every inner step; plain DiLoCo does all its work in outer_step."""

    @torch.no_grad()
    def outer_step(self) -> OuterStepStats:
        start = time.perf_counter()
        sync = self.start_sync(range(len(self.params)), with_buffers=True)
        waited, norm = self.finish_sync(sync)
        self.outer_step_count += 1
        return OuterStepStats(self.outer_step_count, time.perf_counter() - start, sync.nbytes,
                              norm, waited)


@dataclass
class Sync:
    """One average in flight (:meth:`DiLoCo.start_sync`): the parameters it covers (indices
    into ``DiLoCo.params``), its posted collectives, and what turns their results into
    means. Holds the pseudo-gradients as they were when it started."""

    index: List[int]
    works: list
    means: Callable[[], Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]
    install_ints: Callable[[], None]
    buffers: List[torch.Tensor]
    with_buffers: bool
    nbytes: int
