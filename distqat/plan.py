"""Who does what: the pure function that maps ranks to pipeline roles.

After the process group is up every worker describes itself as a :class:`Member` and the
members are exchanged (all-gather), so every rank calls :func:`make_plan` on the same
list and gets the same :class:`Plan` without further communication. Nothing here touches
processes or ``torch.distributed``; the plan is a value that can be printed, compared and
tested on its own.

A plan has ``num_stages`` stages and ``num_replicas`` replicas. Each replica is a chain of
ranks, one per stage; the rank holding stage 0 is the replica's *driver*. Ranks that hold
no stage are *spares*: they stay in the group, ready for the next round.

Invariants of every :class:`Plan` (checked when one is built):

* ``roles`` has one entry per rank, ordered by rank, ranks ``0..n-1``.
* every ``(stage, replica)`` pair in ``range(num_stages) x range(num_replicas)`` is held by
  exactly one rank; spares have ``stage is replica is None``;
* ``is_driver`` holds exactly for stage 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Member:
    """What a worker says of itself after the process group is up."""

    rank: int
    host: str
    device: str = "cpu"
    free_memory: int = 0
    """Free memory on ``device``, in bytes."""
    speed: float = 1.0
    """Relative measured speed, higher is faster."""
    holds: Tuple[Tuple[int, int], ...] = ()
    """``(stage, outer_step)`` pairs of the checkpoints this member holds."""
    restarts: int = 0
    """How often this member's agent has restarted its workers (TORCHELASTIC_RESTART_COUNT)."""


@dataclass(frozen=True)
class Role:
    """The part one rank plays in a plan."""

    rank: int
    stage: Optional[int]
    """The stage this rank hosts; None for a spare."""
    replica: Optional[int]
    """The replica this rank belongs to; None for a spare."""
    is_driver: bool
    """True for the rank holding stage 0 of its replica: it loads data and runs the chain."""

    @property
    def is_spare(self) -> bool:
        return self.stage is None


@dataclass(frozen=True)
class Plan:
    """Ranks mapped to (stage, replica); see the module docstring for the invariants."""

    num_stages: int
    num_replicas: int
    roles: Tuple[Role, ...]
    """One per rank, ordered by rank."""
    hosts: Tuple[str, ...]
    """The host of each rank, aligned with ``roles``; kept so the plan prints by itself."""

    def __post_init__(self) -> None:
        if len(self.hosts) != len(self.roles):
            raise ValueError(f"plan: {len(self.roles)} roles but {len(self.hosts)} hosts")
        seen: Dict[Tuple[int, int], int] = {}
        for index, role in enumerate(self.roles):
            if role.rank != index:
                raise ValueError(f"plan: roles must be ordered by rank 0..n-1, "
                                 f"position {index} holds rank {role.rank}")
            if (role.stage is None) != (role.replica is None):
                raise ValueError(f"plan: rank {role.rank} has stage {role.stage} but "
                                 f"replica {role.replica}; both or neither must be None")
            if role.stage is None:
                if role.is_driver:
                    raise ValueError(f"plan: spare rank {role.rank} cannot be a driver")
                continue
            if not (0 <= role.stage < self.num_stages and 0 <= role.replica < self.num_replicas):
                raise ValueError(f"plan: rank {role.rank} has (stage {role.stage}, replica "
                                 f"{role.replica}) outside {self.num_stages} stages x "
                                 f"{self.num_replicas} replicas")
            if role.is_driver != (role.stage == 0):
                raise ValueError(f"plan: rank {role.rank} at stage {role.stage} has "
                                 f"is_driver={role.is_driver}; drivers are exactly stage 0")
            key = (role.stage, role.replica)
            if key in seen:
                raise ValueError(f"plan: stage {role.stage} of replica {role.replica} is "
                                 f"held by both rank {seen[key]} and rank {role.rank}")
            seen[key] = role.rank
        if len(seen) != self.num_stages * self.num_replicas:
            raise ValueError(f"plan: {len(seen)} (stage, replica) slots filled, expected "
                             f"{self.num_stages} x {self.num_replicas}")

    @property
    def world_size(self) -> int:
        return len(self.roles)

    def role(self, rank: int) -> Role:
        self._check_rank(rank)
        return self.roles[rank]

    def host(self, rank: int) -> str:
        self._check_rank(rank)
        return self.hosts[rank]

    def stage_ranks(self, stage: int) -> Tuple[int, ...]:
        """The ranks hosting ``stage``, ordered by replica: the members of its group."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} out of range: plan has {self.num_stages} stages")
        by_replica = sorted((r.replica, r.rank) for r in self.roles if r.stage == stage)
        return tuple(rank for _, rank in by_replica)

    def replica_ranks(self, replica: int) -> Tuple[int, ...]:
        """The ranks of ``replica``, ordered by stage: index ``i`` hosts stage ``i``."""
        if not 0 <= replica < self.num_replicas:
            raise ValueError(f"replica {replica} out of range: plan has "
                             f"{self.num_replicas} replicas")
        by_stage = sorted((r.stage, r.rank) for r in self.roles if r.replica == replica)
        return tuple(rank for _, rank in by_stage)

    def driver(self, replica: int) -> int:
        return self.replica_ranks(replica)[0]

    @property
    def spares(self) -> Tuple[int, ...]:
        return tuple(r.rank for r in self.roles if r.stage is None)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < len(self.roles):
            raise ValueError(f"rank {rank} out of range: plan has {len(self.roles)} ranks")

    def _at(self, rank: int) -> str:
        return f"rank{rank}@{self.hosts[rank]}"

    def __str__(self) -> str:
        n_spares = len(self.spares)
        lines = [f"plan: {self.num_stages} stage{'s' * (self.num_stages != 1)} x "
                 f"{self.num_replicas} replica{'s' * (self.num_replicas != 1)}, "
                 f"{n_spares} spare{'s' * (n_spares != 1)}"]
        for replica in range(self.num_replicas):
            ranks = self.replica_ranks(replica)
            cells = "  ".join(f"stage{s}={self._at(rank)}" for s, rank in enumerate(ranks))
            lines.append(f"replica {replica}: {cells}  (driver rank{ranks[0]})")
        spares = "  ".join(self._at(rank) for rank in self.spares) or "none"
        lines.append(f"spares: {spares}")
        return "\n".join(lines)


def make_plan(members: Sequence[Member], num_stages: int,
              max_replicas: Optional[int] = None) -> Plan:
    """Assign every member a stage and replica, or make it a spare.

    ``num_replicas = len(members) // num_stages``, capped by ``max_replicas``. The plan
    depends only on the members' ranks and hosts, never on the order they are given in,
    so every rank computes the same plan. Priorities, highest first:

    1. **Whole replicas on one host**, as many as can be: activations then never cross
       the network. That is ``min(num_replicas, sum(host_size // num_stages))`` replicas.
    2. **Replicas of a stage on different hosts**: single-host replicas are dealt to hosts
       round-robin (hosts ordered by their lowest rank), one per host per round, so a host
       failure takes as few copies of each stage as the hosts' sizes allow -- none twice
       while there are no more such replicas than hosts that can hold one.
    3. **Few hosts per split replica**: a replica that cannot sit on one host is built from
       the leftovers; it takes the largest leftovers until it has enough, and the last
       piece from the smallest leftover that completes it (keeping large ones for the
       next split replica). Its stages on one host are consecutive, so the chain crosses
       the network once per extra host.

    Within a host, ranks are taken lowest first and stage order follows rank order (the
    lowest rank is stage 0 and the driver); pieces of a split replica follow each other in
    order of their lowest rank. Replicas are numbered by their driver's rank. Spares are
    what is left: the highest ranks of hosts that cannot hold another replica.

    ``device``, ``free_memory``, ``speed`` and ``holds`` do not move anyone yet: placing by
    rank keeps a stage on the same workers across rounds (near its checkpoints) where a
    placement chasing measured speed would move stages on every restart.

    Raises:
        ValueError: ``num_stages < 1``, ``max_replicas < 1``, no members, ranks that are not
            exactly ``0..n-1``, or fewer members than stages.
    """
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
    if max_replicas is not None and (not isinstance(max_replicas, int) or max_replicas < 1):
        raise ValueError(f"max_replicas must be None or an integer >= 1, got {max_replicas!r}")
    if not members:
        raise ValueError("members is empty: a plan needs at least one member")
    ordered = sorted(members, key=lambda m: m.rank)
    ranks = [m.rank for m in ordered]
    if ranks != list(range(len(ordered))):
        duplicated = sorted({r for r in ranks if ranks.count(r) > 1})
        missing = sorted(set(range(len(ordered))) - set(ranks))
        raise ValueError(f"member ranks must be exactly 0..{len(ordered) - 1} once each; "
                         f"duplicated: {duplicated}, missing: {missing}")
    if len(ordered) < num_stages:
        raise ValueError(f"{len(ordered)} members cannot host {num_stages} stages: "
                         f"need at least one member per stage")

    num_replicas = len(ordered) // num_stages
    if max_replicas is not None:
        num_replicas = min(num_replicas, max_replicas)

    # Members still free on each host, lowest rank first; dict order = order of each
    # host's lowest rank, since members were sorted by rank.
    free: Dict[str, List[int]] = {}
    for m in ordered:
        free.setdefault(m.host, []).append(m.rank)

    replicas: List[List[int]] = []
    dealt = True
    while len(replicas) < num_replicas and dealt:
        dealt = False
        for host_ranks in free.values():
            if len(replicas) < num_replicas and len(host_ranks) >= num_stages:
                replicas.append(host_ranks[:num_stages])
                del host_ranks[:num_stages]
                dealt = True
    while len(replicas) < num_replicas:
        replicas.append(_split_replica(free, num_stages))
    replicas.sort(key=lambda chain: chain[0])

    roles: List[Role] = [Role(rank=r, stage=None, replica=None, is_driver=False)
                         for r in range(len(ordered))]
    for replica, chain in enumerate(replicas):
        for stage, rank in enumerate(chain):
            roles[rank] = Role(rank=rank, stage=stage, replica=replica, is_driver=stage == 0)
    return Plan(num_stages=num_stages, num_replicas=num_replicas, roles=tuple(roles),
                hosts=tuple(m.host for m in ordered))


def _split_replica(free: Dict[str, List[int]], num_stages: int) -> List[int]:
    """Take ``num_stages`` ranks from as few hosts as the free lists allow (greedy).

    Taking the largest free lists first gives the fewest hosts for this replica; the last
    piece comes from the smallest list that completes it so larger lists stay whole for
    the next split replica. Mutates ``free``. The caller guarantees enough free ranks.
    """
    order = {host: i for i, host in enumerate(free)}
    by_size = sorted((h for h in free if free[h]), key=lambda h: (-len(free[h]), order[h]))
    whole: List[str] = []
    have = 0
    for host in by_size:
        if have + len(free[host]) >= num_stages:
            break
        whole.append(host)
        have += len(free[host])
    need = num_stages - have
    last = min((h for h in by_size if h not in whole and len(free[h]) >= need),
               key=lambda h: (len(free[h]), order[h]))
    pieces = [(h, len(free[h])) for h in whole] + [(last, need)]
    pieces.sort(key=lambda piece: free[piece[0]][0])
    chain: List[int] = []
    for host, count in pieces:
        chain.extend(free[host][:count])
        del free[host][:count]
    return chain
