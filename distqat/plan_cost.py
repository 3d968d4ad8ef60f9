"""What a fleet will do before it exists: the cost model of ``python -m distqat.simulate``.

Pure arithmetic over per-stage costs (measured by ``distqat.stage_times`` or derived from
FLOPs) and a fleet (hosts, their links); no torch, no processes. Every time is seconds,
every size bytes. (Over 450 lines on purpose: about half is this docstring, the formulas
the code below implements one to one; they read best beside it.) The model follows what
distqat runs, step by step:

**Links.** Each host has one full-duplex link of ``bandwidth`` bits/s and one-way
``latency`` alpha. Payload goes at ``beta = bandwidth / 8 * eta`` bytes/s with
``eta = 0.95`` (TCP/IPv4 with timestamps carries 1448 payload bytes per 1514-byte frame at
MTU 1500; measured 93-97 % through ``tc tbf`` here). Stages of one host talk over
loopback RPC: :data:`LOCAL` (1 MB RPC round trip 0.78 ms here, BENCHMARKS.md).

**Collectives** (gloo's ring algorithms), ``n`` ranks, ``N`` payload bytes per rank::

    all-reduce  AR_n(N) = 2(n-1)/n * N/beta + 2(n-1) alpha + gamma   sends 2(n-1)/n * N
    all-gather  AG_n(N) = (n-1) * N/beta    + (n-1) alpha + gamma    sends (n-1) * N
    broadcast   BC_n(N) = ceil(log2 n) (N/beta + alpha) + gamma      (binomial tree: the
                                                                  root's link; n = 1: all 0)

``gamma``: one collective call's own cost on the hosts' CPUs (posting it, gloo's thread
taking it, the handshake, the wait), whatever its size; ``--profile`` measures it as a
one-element all-gather among processes of this machine (~0.2 ms here between two), so it
also holds loopback's latency (~0.03 ms).

**Inner step** of one replica: ``S`` stages, ``M`` micro-batches; per micro-batch stage
``s`` computes ``f_s`` forward and ``g_s`` backward, then its optimizer ``o_s`` per step.
Hop ``s`` (stage s -> s+1) carries ``a_s`` bytes forward (the activation in the wire
format plus the targets, which travel to the last stage) and ``a'_s`` back (its gradient):
busy times ``h_s = a_s/beta_s``, ``k_s = a'_s/beta_s``, delay per message
``alpha_s = alpha(link_s) + mu`` (host link when the plan puts s and s+1 on different
hosts, else LOCAL; ``mu``: one RPC message's own cost on the hosts' CPUs, serialising,
dispatching to an RPC thread, distributed autograd's bookkeeping, answering; ``--profile``
measures it on the real pipeline over loopback, ~0.7 ms here, see
:mod:`distqat.stage_profile`). ``Lambda = sum_s alpha_s``. Every formula below charges
``alpha_s`` once per message on the critical path: the activation forward, the loss's
return, the backward's start and its gradient message, and each step RPC.
Per inner step the driver also does its own bookkeeping (cutting the batch, the futures,
weighting the losses, reading the loss): ``delta``, measured by ``--profile`` as the real
driver's ``train_step`` on a one-stage chain less that stage's own work, in pairs.

* gpipe: a flow shop over resources r = (stage 0, hop 0, stage 1, ..., stage S-1).
  Micro-batch m reaches r at ``A[r][m] = C[r-1][m] + d_{r-1}`` (``d``: the hop's
  latency). A stage serves one at a time, in order: ``C[r][m] = max(A[r][m], C[r][m-1])
  + t_r``. So does a link with ``comm.rpc_channels: single`` (one TCP connection per
  pair of workers: two micro-batches' activations sent back to back arrive after h and
  2 h). With ``multiplexed`` (each tensor cut over 16 connections) a link carries every
  message on it at once, sharing its bandwidth equally (processor sharing: measured here,
  both arrive after 2 h, so a 3-stage pipeline overlaps nothing):
  ``C[r][.] = PS(A[r][.], h_s)``. ``T_fwd = max_m C[last][m]``; the losses come back
  along the RPC chain (Lambda), the backward starts there once the driver has them
  (Lambda again), and runs as the same flow shop reversed (``g_s``, ``k_s``): ``T_bwd``.
  Then one ``step`` RPC to every other stage (none for one stage)::

      T_inner = T_fwd + 2 Lambda + T_bwd + [S > 1] 2 alpha_max + max_s o_s + delta

* 1f1b: one micro-batch's round trip ``R = sum_s (f_s + g_s + h_s + k_s) + 4 Lambda``, the
  bottleneck ``b = max_s max(f_s + g_s, h_s, k_s)``, at most S micro-batches in flight::

      T_inner = R + (M-1) * (b if M <= S else max(b, R/S)) + 2 alpha_max (last fold)
                + [S > 1] 2 alpha_max + max_s o_s + delta

**Calibration** (``simulate --calibrate``, :mod:`distqat.step_calibration`): a stage's loop
misses what a real step does around it (the RPC agent's and the data loader's threads,
distributed autograd's engine, the launcher's agent, other replicas on shared cores). A
short real run of the config measures ``T_run``, the mean inner step; with ``T_inner``
from the profile on this machine's hops (LOCAL), ``kappa = T_run / T_inner`` multiplies
every ``f_s``, ``g_s``, ``o_s`` and ``delta`` (1 without it). DDP's ``F``, ``G``, ``O`` and
the outer step's local work stay as profiled.

**Outer step** (DiLoCo, ``H`` inner steps), stage s with ``n_s`` replicas (the plan puts
them on different hosts), ``P_s`` trainable and ``Q_s`` float-buffer elements of ``e``
bytes, int8 chunk ``c``::

    fp32  V_s = AR(e (P_s + Q_s))
    bf16  V_s = AG(2 P_s) + AR(e Q_s)
    int8  V_s = AG(P_s) + AG(4 ceil(P_s / c)) + AR(e Q_s)
    all three + BC(bytes of the integer and bool buffers), which DiLoCo takes from rank 0

Between two replicas DiLoCo all-gathers a payload of ``N`` bytes in
``k(N) = min(64, ceil(N / piece))`` pieces (in one piece gloo's 2-rank all-gather ran up to
50 % slower than the link), each a call of its own: ``AG_2(N) = N/beta + k(N) (alpha +
gamma)``; with more replicas in one piece (``k = 1``). ``piece`` is what
``DiLoCo.probe_link`` picks: 4 ms of the rate a one-piece all-gather of 256 kB reaches,
at least 64 kB (``diloco.ALLGATHER_PIECE_SECONDS``, ``PROBE_BYTES``,
``ALLGATHER_CHUNK_BYTES``)::

    piece = max(64 kB, 4 ms * 256 kB / (256 kB / beta + alpha + gamma))

(``pseudo_allreduce``: the compressed payload by a ring all-reduce instead, as INTELLECT-1
does; *not built in distqat*.) Local work ``L_s`` = the measured outer step of one replica
(delta, encode, one decode, outer SGD, copy) ``+ (n_s - 1) decode_s``. A host's link
carries the collectives of every worker it holds (bytes add up, latencies overlap)::

    T_sync  = W_n(H) + max_hosts (sum_w sent_w / beta + max_w latency_w) + max_s L_s
              + 2 alpha_call
    T_outer = H T_inner + T_sync

(``alpha_call = alpha + mu``: the driver's outer-step RPC to its other stages; 0 for one
stage.) ``W_n(k)``: the wait for the slowest replica (stragglers). A micro-batch's forward +
backward + step on stage s varies by chance, standard deviation ``sigma_s`` (``--profile``
samples it for about a second; 0 from FLOPs), so k inner steps of a replica take their mean
plus a normal spread of ``sigma sqrt(k)``, ``sigma^2 = M sum_s sigma_s^2`` (steps and stages
independent), and the collectives start when the slowest of n has arrived::

    W_n(k) = e_n sigma sqrt(k),   e_n = E[max of n standard normals]
                                  (0, 0.56, 0.85, 1.42, 2.34, 3.04 for n = 1, 2, 3, 8, 64, 512)

Streaming DiLoCo (``F`` fragments, overlap ``tau``): fragment j moves ``1/F`` of the
bytes (buffers with the last) in the background and is waited for ``tau`` inner steps
after it was posted: ``T_outer = H T_inner + sum_j (max(0, W_n(H/F) + V_j - tau T_inner) +
L/F)`` (tau = 0: the whole ``V_j``).

**Fleet figures.** Utilisation = time computing / wall time over every worker (spares
idle): ``U = sum_w H (M (f_w + g_w) + o_w) / (W T_outer)``; samples/s = ``R B H / T_outer``
(R replicas, B samples per inner step); bytes per host per outer step, each kind the
largest over hosts: activations sent (``H M a_s`` per crossing hop), gradients sent back
(``H M a'_s``) and pseudo-gradients (what a host's workers send in their collectives).

**DDP** on the same workers: every worker a replica of the whole model at batch B:
forward ``F``, backward ``G``, optimizer ``O``; gradients in DDP's buckets (1 MiB first,
then 25 MiB, parameters in reverse order), bucket i ready at ``r_i`` (the share of the
backward's FLOPs done when its last gradient is), all-reduced one at a time, a call
each: ``e_i = max(r_i, e_{i-1}) + AR_n(bytes_i)``, ``T_ddp = F + max(G, e_last) + O + e_n
sigma_full`` (every step waits for the slowest rank; ``sigma_full``: the step's jitter),
``U = (F + G + O) / T_ddp``, samples/s ``= n B / T_ddp``, bytes per host per H steps
``= H sum_i 2(n-1)/n bytes_i``.

**Where it is optimistic** (BENCHMARKS.md has the runs): identical hosts whose steps vary
only as profiled, independent and normal (a slower host, heavier tails, or slowdowns the
profile did not see, such as a testbed's packet forwarding, wait longer) and steady links
(no jitter, no TCP slow start or window limits on long fat links); compute as profiled (the
stages' own work, the driver's bookkeeping ``delta``, the RPC messages' ``mu`` and the
collective calls' ``gamma``; from FLOPs ``delta = mu = gamma = sigma = 0``; without
``--calibrate``, a real step's other threads are not seen: 1.2-1.6x on this machine's shared
cores) or at a fixed FLOP rate, over a profile of milliseconds (a run's later steps can be
slower: with ``flush_denormal: false``, subnormal optimizer states made the testbed's steps
1.5-2x slower than profiled; with ``malloc_reuse: false``, memory the outer step freed is
faulted in again by the next steps, which a profile's loop barely sees); the CPU the kernel
spends forwarding a fast link's packets on the hosts is not taken from compute; TCP's own
dynamics on a message (slow start after idle, losses at a short queue) are not modelled;
activations and background averages crossing one link are not slowed by each other beyond
adding bytes; checkpoints, eval and logging cost nothing. **Pessimistic**: latency terms of
consecutive collectives add up (gloo may overlap some), and a ring's 2(n-1) latencies where
NCCL would pick a tree for many ranks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from .plan import Member, make_plan

ETA = 0.95  # payload share of a TCP/IPv4 frame at MTU 1500 (1448 / 1514)
DDP_FIRST_BUCKET = 1 << 20  # torch DDP: the first bucket is capped at 1 MiB ...
DDP_BUCKET = 25 << 20  # ... the others at bucket_cap_mb = 25
SCHEDULES = ("gpipe", "1f1b")
AG_PIECE_BYTES = 64 * 1024  # distqat.diloco.ALLGATHER_CHUNK_BYTES (no torch here) ...
AG_MAX_PIECES = 64  # ... and ALLGATHER_MAX_PIECES: DiLoCo's all-gather pieces ...
AG_PIECE_SECONDS = 0.004  # ... ALLGATHER_PIECE_SECONDS ...
AG_PROBE_BYTES = 256 * 1024  # ... and PROBE_BYTES (DiLoCo.probe_link)
WIRES = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class Link:
    """One host's link: ``bandwidth`` in bits/s, one-way ``latency`` in seconds."""

    bandwidth: float
    latency: float = 0.0
    efficiency: float = ETA

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ValueError(f"link bandwidth must be > 0 bits/s, got {self.bandwidth}")
        if not self.latency >= 0:
            raise ValueError(f"link latency must be >= 0 s, got {self.latency}")

    @property
    def beta(self) -> float:
        """Payload bytes per second."""
        return self.bandwidth / 8 * self.efficiency


# same-host hops: RPC over loopback TCP (1 MB round trip 0.78 ms, BENCHMARKS.md)
LOCAL = Link(bandwidth=2.6e9 * 8, latency=1e-4, efficiency=1.0)


def allreduce_s(nbytes: float, n: int, link: Link) -> float:
    """Ring all-reduce of ``nbytes`` per rank over ``n`` ranks."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.beta + 2 * (n - 1) * link.latency


def allgather_s(nbytes: float, n: int, link: Link) -> float:
    """Ring all-gather where every rank contributes ``nbytes``."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * nbytes / link.beta + (n - 1) * link.latency


def allgather_pieces(nbytes: float, n: int, link: Optional[Link] = None,
                     gamma: float = 0.0) -> int:
    """How many all-gathers DiLoCo cuts a payload of ``nbytes`` over ``n`` ranks into (each
    pays the ring's latencies): between two, pieces of what ``DiLoCo.probe_link`` finds
    for ``link`` (see the docstring; no link: :data:`AG_PIECE_BYTES`), at most
    :data:`AG_MAX_PIECES`; else one."""
    if n != 2:
        return 1
    piece = AG_PIECE_BYTES
    if link is not None:
        probe_s = AG_PROBE_BYTES / link.beta + link.latency + gamma
        piece = max(AG_PIECE_BYTES, int(AG_PROBE_BYTES / probe_s * AG_PIECE_SECONDS))
    return max(1, min(AG_MAX_PIECES, math.ceil(nbytes / piece)))


@functools.lru_cache(maxsize=None)
def expected_max(n: int) -> float:
    """E[max of n independent standard normals]: 0 for one, 1/sqrt(pi) for two, ~3.04
    for 512 (numerically, over [-9, 9])."""
    if n <= 1:
        return 0.0
    steps, lo, hi = 6000, -9.0, 9.0
    dx = (hi - lo) / steps
    total = 0.0
    for i in range(steps + 1):
        x = lo + i * dx
        pdf = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        total += (0.5 if i in (0, steps) else 1.0) * x * n * pdf * cdf ** (n - 1)
    return total * dx


def straggle_s(w: "Workload", n: int, steps: float) -> float:
    """How long the fastest of ``n`` replicas' mean waits for the slowest after ``steps``
    inner steps each: ``e_n sigma sqrt(steps)`` (see the docstring)."""
    var = sum(w.microbatches * s.sd_s ** 2 for s in w.stages)
    return expected_max(n) * math.sqrt(var * steps)


def allreduce_sent(nbytes: float, n: int) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes


def allgather_sent(nbytes: float, n: int) -> float:
    return 0.0 if n <= 1 else (n - 1) * nbytes


@dataclass(frozen=True)
class StageCost:
    """One stage of one replica. Times per micro-batch (``step_s`` per inner step);
    ``act_bytes`` / ``grad_bytes``: what hop s -> s+1 carries per micro-batch forward
    (activation in its wire format plus targets) and back (0 for the last stage);
    ``outer_local_s``: one replica's outer step alone in the run's wire format;
    ``decode_s``: decoding one peer's compressed payload."""

    fwd_s: float
    bwd_s: float
    step_s: float
    params: int
    float_buffers: int = 0
    int_buffer_bytes: int = 0  # integer/bool buffers: broadcast from the first rank
    act_bytes: float = 0.0
    grad_bytes: float = 0.0
    outer_local_s: float = 0.0
    decode_s: float = 0.0
    sd_s: float = 0.0  # standard deviation of one micro-batch's fwd + bwd + step (jitter)


@dataclass(frozen=True)
class FullCost:
    """The whole model on one worker at the full batch (DDP): times, and the gradient
    buckets as (bytes, share of the backward done when the bucket is ready)."""

    fwd_s: float
    bwd_s: float
    step_s: float
    buckets: Tuple[Tuple[float, float], ...]
    sd_s: float = 0.0  # standard deviation of one step (jitter)


@dataclass(frozen=True)
class Workload:
    stages: Tuple[StageCost, ...]
    microbatches: int
    batch: int
    inner_steps: int
    schedule: str = "gpipe"
    fragments: int = 1
    overlap_steps: int = 0
    pseudo_wire: str = "fp32"
    element_bytes: int = 4
    chunk_size: int = 4096
    pseudo_allreduce: bool = False
    full: Optional[FullCost] = None
    rpc_s: float = 0.0  # mu: one RPC message's own cost (CPU), added to every hop's delay
    driver_s: float = 0.0  # delta: the driver's own work per inner step
    collective_s: float = 0.0  # gamma: one collective call's own cost (CPU), per call
    links_share: bool = False  # comm.rpc_channels multiplexed: a link's messages at once

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.pseudo_wire not in WIRES:
            raise ValueError(f"pseudo_wire: expected one of {WIRES}, got {self.pseudo_wire!r}")
        if not self.stages or self.microbatches < 1 or self.inner_steps < 1 or self.batch < 1:
            raise ValueError("a workload needs >= 1 stage, micro-batch, inner step and sample")


@dataclass(frozen=True)
class Fleet:
    hosts: int
    link: Link
    workers_per_host: int = 1

    def __post_init__(self) -> None:
        if self.hosts < 1 or self.workers_per_host < 1:
            raise ValueError(f"a fleet needs >= 1 host and worker per host, got "
                             f"{self.hosts} x {self.workers_per_host}")

    @property
    def workers(self) -> int:
        return self.hosts * self.workers_per_host


@dataclass
class Prediction:
    """DiLoCo on the fleet. Bytes: what one host sends per outer step, the largest over
    hosts (each kind on its own)."""

    replicas: int
    spares: int
    inner_s: float
    sync_s: float
    outer_s: float
    activation_bytes: float
    gradient_bytes: float
    pseudo_grad_bytes: float
    utilisation: float
    samples_per_s: float


@dataclass
class DDPPrediction:
    """DDP on the same workers. Bytes per host per ``inner_steps`` steps."""

    ranks: int
    step_s: float
    outer_s: float
    gradient_bytes: float
    utilisation: float
    samples_per_s: float


@dataclass
class Layout:
    """Where the plan puts things: ``chains[r][s]`` is the host of stage s of replica r."""

    chains: List[List[int]]
    spares: int
    host_stages: List[List[int]] = field(default_factory=list)  # stages each host holds


def layout(fleet: Fleet, num_stages: int) -> Layout:
    """distqat's own plan (:func:`distqat.plan.make_plan`) for this fleet: whole replicas
    on one host where they fit, replicas of a stage on different hosts."""
    if fleet.workers < num_stages:
        raise ValueError(f"{fleet.hosts} hosts x {fleet.workers_per_host} workers cannot "
                         f"hold {num_stages} stages")
    members = [Member(rank=r, host=f"h{r // fleet.workers_per_host:06d}")
               for r in range(fleet.workers)]
    plan = make_plan(members, num_stages)
    host_of = [r // fleet.workers_per_host for r in range(fleet.workers)]
    chains = [[host_of[rank] for rank in plan.replica_ranks(r)]
              for r in range(plan.num_replicas)]
    held: List[List[int]] = [[] for _ in range(fleet.hosts)]
    for chain in chains:
        for s, h in enumerate(chain):
            held[h].append(s)
    return Layout(chains, len(plan.spares), held)


def shared(arrivals: Sequence[float], work: float) -> List[float]:
    """Departures from a link that shares its capacity equally among the messages on it
    (processor sharing), each needing ``work`` seconds alone, arriving at ``arrivals``."""
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i])
    left = {}  # message -> work left
    out = [0.0] * len(arrivals)
    now, k = 0.0, 0
    while k < len(order) or left:
        nxt = arrivals[order[k]] if k < len(order) else math.inf
        if not left:
            now = max(now, nxt)
        if left:
            first = min(left, key=left.get)
            finish = now + left[first] * len(left)
            if finish <= nxt:  # a departure before the next arrival
                for i in left:
                    left[i] -= (finish - now) / len(left)
                now = finish
                out[first] = now
                del left[first]
                continue
            for i in left:
                left[i] -= (nxt - now) / len(left)
            now = nxt
        while k < len(order) and arrivals[order[k]] <= now:
            left[order[k]] = work
            k += 1
    return out


def flow_shop(resources: Sequence[Tuple[float, float, bool]], items: int,
              links_share: bool = False) -> float:
    """When the last of ``items`` leaves the last resource. A resource (busy, delay,
    is_link) gets each item ``delay`` after the previous resource is done with it; a
    stage serves items in order, one at a time, and so does a link, unless
    ``links_share``: then it serves those on it at once, sharing its bandwidth
    (:func:`shared`)."""
    done = [0.0] * items
    ready_delay = 0.0
    for busy, delay, is_link in resources:
        arrivals = [d + ready_delay for d in done]
        if is_link and links_share:
            done = shared(arrivals, busy)
        else:
            free = 0.0
            for m in range(items):
                free = max(arrivals[m], free) + busy
                done[m] = free
        ready_delay = delay
    return max(done)


def _hop_links(chain: Sequence[int], link: Link) -> List[Link]:
    return [link if a != b else LOCAL for a, b in zip(chain, chain[1:])]


def inner_step_s(w: Workload, hops: Sequence[Link]) -> float:
    """One inner step of one replica whose hop s uses ``hops[s]`` (see the docstring)."""
    st, M = w.stages, w.microbatches
    h = [s.act_bytes / l.beta for s, l in zip(st, hops)]
    k = [s.grad_bytes / l.beta for s, l in zip(st, hops)]
    lat = [l.latency + w.rpc_s for l in hops]  # alpha_s: per message on hop s
    lam = sum(lat)
    alpha_max = max(lat, default=0.0)  # 0 for one stage: no step RPC
    step = max(s.step_s for s in st) + 2 * alpha_max + w.driver_s
    if w.schedule == "gpipe":
        fwd: List[Tuple[float, float, bool]] = []
        bwd: List[Tuple[float, float, bool]] = []
        for i, s in enumerate(st):
            fwd.append((s.fwd_s, 0.0, False))
            if i < len(hops):
                fwd.append((h[i], lat[i], True))
        for i in reversed(range(len(st))):
            bwd.append((st[i].bwd_s, 0.0, False))
            if i > 0:
                bwd.append((k[i - 1], lat[i - 1], True))
        fwd_t = flow_shop(fwd, M, w.links_share)
        bwd_t = flow_shop(bwd, M, w.links_share)
        return fwd_t + 2 * lam + bwd_t + step
    R = sum(s.fwd_s + s.bwd_s for s in st) + sum(h) + sum(k) + 4 * lam
    b = max([s.fwd_s + s.bwd_s for s in st] + h + k)
    interval = b if M <= len(st) else max(b, R / len(st))
    return R + (M - 1) * interval + 2 * alpha_max + step


def _stage_sync(w: Workload, s: StageCost, n: int, link: Link,
                share: float = 1.0, buffers: bool = True) -> Tuple[float, float, float]:
    """(bandwidth seconds, latency seconds, bytes sent) of averaging ``share`` of stage
    ``s``'s parameters over ``n`` replicas (``buffers``: its buffers too)."""
    P = s.params * share
    Q = s.float_buffers * w.element_bytes if buffers else 0.0
    parts: List[Tuple[str, float]] = []
    if w.pseudo_wire == "fp32":
        parts.append(("ar", P * w.element_bytes + Q))
    else:
        payload = 2 * P if w.pseudo_wire == "bf16" else P
        kind = "ar" if w.pseudo_allreduce else "ag"
        parts.append((kind, payload))
        if w.pseudo_wire == "int8":
            parts.append((kind, 4 * math.ceil(P / w.chunk_size)))
        if Q:
            parts.append(("ar", Q))
    sent = sum(allreduce_sent(b, n) if kind == "ar" else allgather_sent(b, n)
               for kind, b in parts if b > 0)
    # every call pays its ring's latencies and its own cost gamma; pieces are calls
    latency = sum(2 * (n - 1) * link.latency + w.collective_s if kind == "ar"
                  else allgather_pieces(b, n, link, w.collective_s)
                  * ((n - 1) * link.latency + w.collective_s)
                  for kind, b in parts if b > 0 and n > 1)
    if buffers and s.int_buffer_bytes and n > 1:  # gloo's broadcast: a binomial tree
        hops = math.ceil(math.log2(n))
        sent += hops * s.int_buffer_bytes  # the root's link, the busiest
        latency += hops * link.latency + w.collective_s
    return sent / link.beta, latency, sent


def _local_s(w: Workload, s: StageCost, n: int) -> float:
    extra = (n - 1) * s.decode_s if w.pseudo_wire != "fp32" and not w.pseudo_allreduce else 0.0
    return s.outer_local_s + extra


def predict(w: Workload, fleet: Fleet) -> Prediction:
    """DiLoCo on ``fleet`` with distqat's plan (see the module docstring)."""
    lay = layout(fleet, len(w.stages))
    R, H, M, link = len(lay.chains), w.inner_steps, w.microbatches, fleet.link
    inner = max(inner_step_s(w, _hop_links(chain, link)) for chain in lay.chains)
    n = R  # replicas per stage group
    remote = any(len(set(chain)) > 1 for chain in lay.chains)
    per_stage = [_stage_sync(w, s, n, link) for s in w.stages]
    host_bw = [sum(per_stage[s][0] for s in held) for held in lay.host_stages]
    host_lat = [max((per_stage[s][1] for s in held), default=0.0) for held in lay.host_stages]
    local = max(_local_s(w, s, n) for s in w.stages)
    # the driver's outer_step call reaches its other stages by RPC (stage 0 is its own)
    call = (2 * (link.latency + w.rpc_s) if remote
            else 2 * (LOCAL.latency + w.rpc_s) if len(w.stages) > 1 else 0.0)
    if w.fragments == 1:
        sync = (straggle_s(w, n, H) + max(b + l for b, l in zip(host_bw, host_lat))
                + local + call)
    else:
        F, tau = w.fragments, w.overlap_steps
        sync = 0.0
        for j in range(F):
            last = j == F - 1
            frag = [_stage_sync(w, s, n, link, 1.0 / F, buffers=last) for s in w.stages]
            v = max((sum(frag[s][0] for s in held) + max((frag[s][1] for s in held),
                                                          default=0.0))
                    for held in lay.host_stages)
            sync += max(0.0, straggle_s(w, n, H / F) + v - tau * inner) + local / F
        sync += call
    outer = H * inner + sync
    compute = sum(H * (M * (w.stages[s].fwd_s + w.stages[s].bwd_s) + w.stages[s].step_s)
                  for chain in lay.chains for s in range(len(chain)))
    act = [0.0] * fleet.hosts
    grad = [0.0] * fleet.hosts
    for chain in lay.chains:
        for s, (a, b) in enumerate(zip(chain, chain[1:])):
            if a != b:
                act[a] += H * M * w.stages[s].act_bytes
                grad[b] += H * M * w.stages[s].grad_bytes
    pseudo = [sum(per_stage[s][2] for s in held) for held in lay.host_stages]
    return Prediction(replicas=R, spares=lay.spares, inner_s=inner, sync_s=sync, outer_s=outer,
                      activation_bytes=max(act), gradient_bytes=max(grad),
                      pseudo_grad_bytes=max(pseudo),
                      utilisation=compute / (fleet.workers * outer),
                      samples_per_s=R * w.batch * H / outer)


def ddp_buckets(params: Sequence[Tuple[float, float]],
                first: float = DDP_FIRST_BUCKET, cap: float = DDP_BUCKET
                ) -> Tuple[Tuple[float, float], ...]:
    """DDP's buckets from ``params`` = (bytes, share of the backward done when its
    gradient is ready), in the model's parameter order: reversed, the first bucket closed
    at ``first`` bytes, the others at ``cap``; a bucket is ready with its latest gradient."""
    buckets: List[Tuple[float, float]] = []
    size = ready = 0.0
    for nbytes, done in reversed(list(params)):
        size += nbytes
        ready = max(ready, done)
        if size >= (first if not buckets else cap):
            buckets.append((size, ready))
            size = ready = 0.0
    if size:
        buckets.append((size, ready))
    return tuple(buckets)


def predict_ddp(w: Workload, fleet: Fleet) -> DDPPrediction:
    """DDP with every worker of ``fleet`` a replica of the whole model (``w.full``)."""
    if w.full is None:
        raise ValueError("DDP needs the whole model's costs (Workload.full)")
    f, n, link = w.full, fleet.workers, fleet.link
    end = 0.0
    total = 0.0
    for nbytes, ready in f.buckets:
        end = max(f.bwd_s * ready, end) + allreduce_s(nbytes, n, link) + (
            w.collective_s if n > 1 else 0.0)
        total += nbytes
    step = f.fwd_s + max(f.bwd_s, end) + f.step_s + expected_max(n) * f.sd_s
    return DDPPrediction(ranks=n, step_s=step, outer_s=w.inner_steps * step,
                         gradient_bytes=w.inner_steps * allreduce_sent(total, n),
                         utilisation=(f.fwd_s + f.bwd_s + f.step_s) / step,
                         samples_per_s=n * w.batch / step)
