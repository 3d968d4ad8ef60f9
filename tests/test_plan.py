"""Unit tests for distqat.plan: invariants over many layouts, examples, errors."""

from __future__ import annotations

import random
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence

import pytest

from distqat.plan import Member, Plan, Role, make_plan

HOSTS = ["hostA", "hostB", "hostC", "hostD"]


# --- layouts: which host each rank lives on ----------------------------------------------

def contiguous(n: int, h: int) -> List[str]:
    """Ranks 0..n-1 cut into h nearly equal consecutive blocks (torchrun's usual order)."""
    return [HOSTS[r * h // n] for r in range(n)]


def interleaved(n: int, h: int) -> List[str]:
    return [HOSTS[r % h] for r in range(n)]


def uneven(n: int, h: int) -> List[str]:
    """Consecutive blocks with sizes proportional to 1, 2, ..., h (each host non-empty)."""
    weights = list(range(1, h + 1))
    sizes = [1] * h
    for _ in range(n - h):
        # Give the next rank to the host furthest below its share.
        i = min(range(h), key=lambda j: (sizes[j] / weights[j], -weights[j]))
        sizes[i] += 1
    return [HOSTS[i] for i, size in enumerate(sizes) for _ in range(size)]


def shuffled(n: int, h: int) -> List[str]:
    """Random host per rank (fixed seed), every host non-empty."""
    rng = random.Random(n * 31 + h)
    hosts = HOSTS[:h] + [rng.choice(HOSTS[:h]) for _ in range(n - h)]
    rng.shuffle(hosts)
    return hosts


LAYOUTS: Dict[str, Callable[[int, int], List[str]]] = {
    "contiguous": contiguous, "interleaved": interleaved, "uneven": uneven,
    "shuffled": shuffled,
}


def members_on(hosts: Sequence[str]) -> List[Member]:
    return [Member(rank=r, host=h) for r, h in enumerate(hosts)]


def cases():
    """Every (n, stages, hosts, layout, max_replicas) with n in 1..16, stages in 1..4 and
    hosts in 1..4 (hosts <= n) where a plan exists."""
    for n in range(1, 17):
        for stages in range(1, 5):
            if n < stages:
                continue
            for h in range(1, min(n, 4) + 1):
                for name, layout in LAYOUTS.items():
                    for cap in (None, 1, 2, 3):
                        yield n, stages, h, name, layout(n, h), cap


# --- helpers over a plan -------------------------------------------------------------------

def replica_hosts(plan: Plan, replica: int) -> List[str]:
    return [plan.hosts[r] for r in plan.replica_ranks(replica)]


def single_host_replicas(plan: Plan) -> List[int]:
    return [i for i in range(plan.num_replicas) if len(set(replica_hosts(plan, i))) == 1]


def capacities(hosts: Sequence[str], stages: int) -> Dict[str, int]:
    """Whole replicas each host could hold alone."""
    return {h: size // stages for h, size in Counter(hosts).items()}


def min_max_load(caps: Sequence[int], k: int) -> int:
    """Smallest t such that k replicas fit with at most t on any host and cap_h on host h:
    the best any placement can do at spreading k single-host replicas."""
    t = 0
    while sum(min(c, t) for c in caps) < k:
        t += 1
    return t


def check_invariants(plan: Plan, hosts: Sequence[str], stages: int,
                     cap: Optional[int], label: str) -> None:
    n = len(hosts)
    expected_replicas = n // stages if cap is None else min(n // stages, cap)
    assert plan.num_stages == stages, label
    assert plan.num_replicas == expected_replicas, label
    assert plan.hosts == tuple(hosts), label

    # Every rank exactly once, in rank order.
    assert [r.rank for r in plan.roles] == list(range(n)), label

    # Each (stage, replica) pair is held by exactly one rank; the rest are spares.
    slots = Counter((r.stage, r.replica) for r in plan.roles if r.stage is not None)
    assert set(slots) == {(s, i) for s in range(stages) for i in range(expected_replicas)}, label
    assert all(count == 1 for count in slots.values()), label
    assert len(plan.spares) == n - stages * expected_replicas, label
    for rank in plan.spares:
        role = plan.role(rank)
        assert role.stage is None and role.replica is None and not role.is_driver, label

    # Drivers are exactly stage 0; accessors agree with the roles.
    for role in plan.roles:
        assert role.is_driver == (role.stage == 0), label
    for i in range(expected_replicas):
        chain = plan.replica_ranks(i)
        assert len(chain) == stages, label
        assert plan.driver(i) == chain[0], label
        assert [plan.role(r).stage for r in chain] == list(range(stages)), label
        assert all(plan.role(r).replica == i for r in chain), label
    for s in range(stages):
        ranks = plan.stage_ranks(s)
        assert [plan.role(r).replica for r in ranks] == list(range(expected_replicas)), label
    # Replicas are numbered by their driver's rank.
    drivers = [plan.driver(i) for i in range(expected_replicas)]
    assert drivers == sorted(drivers), label

    # Within a replica: a host's stages are consecutive (the chain enters each host once)
    # and follow rank order on that host.
    for i in range(expected_replicas):
        chain = plan.replica_ranks(i)
        hs = replica_hosts(plan, i)
        runs = [h for j, h in enumerate(hs) if j == 0 or hs[j - 1] != h]
        assert len(runs) == len(set(hs)), f"{label}: replica {i} re-enters a host: {hs}"
        for h in set(hs):
            on_h = [r for r in chain if plan.hosts[r] == h]
            assert on_h == sorted(on_h), label

    # Single-host replicas: as many as achievable, sum over hosts of
    # host_size // stages, capped by num_replicas.
    caps = capacities(hosts, stages)
    achievable = min(expected_replicas, sum(caps.values()))
    single = single_host_replicas(plan)
    assert len(single) == achievable, f"{label}: {len(single)} single-host, want {achievable}"
    if max(Counter(hosts).values()) >= stages:
        assert single, label

    # Spreading. Property tested: let k be the number of single-host replicas and C the
    # number of hosts that can hold a whole replica. If k <= C, no two single-host replicas
    # share a host, so the copies of every stage held by single-host replicas are on
    # distinct hosts. In general, the most single-host replicas on any one host is the
    # least any placement could achieve (min_max_load).
    per_host = Counter(replica_hosts(plan, i)[0] for i in single)
    capable = sum(1 for c in caps.values() if c > 0)
    if len(single) <= capable:
        assert all(count == 1 for count in per_host.values()), f"{label}: {per_host}"
        for s in range(stages):
            stage_hosts = [plan.hosts[plan.replica_ranks(i)[s]] for i in single]
            assert len(stage_hosts) == len(set(stage_hosts)), label
    if single:
        assert max(per_host.values()) == min_max_load(list(caps.values()), len(single)), label
    # When every replica sits on its own host, every stage group spans distinct hosts.
    if len(single) == expected_replicas and len(single) <= capable:
        for s in range(stages):
            stage_hosts = [plan.hosts[r] for r in plan.stage_ranks(s)]
            assert len(set(stage_hosts)) == len(stage_hosts), label

    # Split replicas: the first one uses the fewest hosts that the leftovers allow (the
    # smallest j whose j largest leftovers reach `stages`), which bounds every split one.
    split = [i for i in range(expected_replicas) if i not in single]
    if split:
        leftovers = sorted((size % stages for size in Counter(hosts).values()), reverse=True)
        fewest = next(j for j in range(1, len(leftovers) + 1)
                      if sum(leftovers[:j]) >= stages)
        used = [len(set(replica_hosts(plan, i))) for i in split]
        assert min(used) == fewest, f"{label}: split replicas use {used}, fewest {fewest}"


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_invariants_over_layouts(stages):
    count = 0
    for n, s, h, name, hosts, cap in cases():
        if s != stages:
            continue
        label = f"n={n} stages={s} hosts={h} layout={name} max_replicas={cap} {hosts}"
        plan = make_plan(members_on(hosts), s, max_replicas=cap)
        check_invariants(plan, hosts, s, cap, label)
        count += 1
    assert count > 100


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_same_plan_whatever_the_member_order(stages):
    rng = random.Random(stages)
    for n, s, h, name, hosts, cap in cases():
        if s != stages or cap not in (None, 2):
            continue
        members = members_on(hosts)
        expected = make_plan(members, s, max_replicas=cap)
        for _ in range(3):
            shuffled_members = members[:]
            rng.shuffle(shuffled_members)
            plan = make_plan(shuffled_members, s, max_replicas=cap)
            assert plan == expected
            assert str(plan) == str(expected)


def test_other_member_fields_do_not_change_the_plan():
    hosts = ["hostA"] * 3 + ["hostB"] * 3
    plain = make_plan(members_on(hosts), 2)
    rich = make_plan([Member(rank=r, host=h, device="cuda", free_memory=(7 - r) << 30,
                             speed=1.0 + r, holds=((r % 2, 5),))
                      for r, h in enumerate(hosts)], 2)
    assert rich == plain


# --- readable examples ----------------------------------------------------------------------

def test_four_workers_one_host_two_stages():
    plan = make_plan(members_on(["hostA"] * 4), 2)
    assert (plan.num_stages, plan.num_replicas) == (2, 2)
    assert plan.replica_ranks(0) == (0, 1)
    assert plan.replica_ranks(1) == (2, 3)
    assert plan.stage_ranks(0) == (0, 2)
    assert plan.stage_ranks(1) == (1, 3)
    assert [plan.driver(i) for i in range(2)] == [0, 2]
    assert plan.spares == ()
    assert plan.role(1) == Role(rank=1, stage=1, replica=0, is_driver=False)
    assert plan.role(2) == Role(rank=2, stage=0, replica=1, is_driver=True)


def test_four_workers_two_hosts_two_stages_one_replica_per_host():
    plan = make_plan(members_on(["hostA", "hostA", "hostB", "hostB"]), 2)
    assert plan.replica_ranks(0) == (0, 1)
    assert replica_hosts(plan, 0) == ["hostA", "hostA"]
    assert plan.replica_ranks(1) == (2, 3)
    assert replica_hosts(plan, 1) == ["hostB", "hostB"]


def test_four_workers_two_hosts_interleaved():
    plan = make_plan(members_on(["hostA", "hostB", "hostA", "hostB"]), 2)
    assert plan.replica_ranks(0) == (0, 2)
    assert plan.replica_ranks(1) == (1, 3)


def test_six_workers_three_hosts_two_stages():
    plan = make_plan(members_on(["hostA"] * 2 + ["hostB"] * 2 + ["hostC"] * 2), 2)
    assert plan.num_replicas == 3
    assert [plan.replica_ranks(i) for i in range(3)] == [(0, 1), (2, 3), (4, 5)]
    for s in range(2):
        assert [plan.hosts[r] for r in plan.stage_ranks(s)] == ["hostA", "hostB", "hostC"]


def test_replicas_spread_round_robin_before_filling_a_host():
    # Both hosts can hold two replicas; with room for only two, take one on each.
    plan = make_plan(members_on(["hostA"] * 4 + ["hostB"] * 4), 2, max_replicas=2)
    assert plan.replica_ranks(0) == (0, 1)
    assert plan.replica_ranks(1) == (4, 5)
    assert plan.spares == (2, 3, 6, 7)


def test_uneven_hosts_leave_spares_where_a_replica_does_not_fit():
    # hostA holds two replicas of 2 stages with one left over; hostB cannot hold one.
    plan = make_plan(members_on(["hostA"] * 5 + ["hostB"]), 2)
    assert [plan.replica_ranks(i) for i in range(3)] == [(0, 1), (2, 3), (4, 5)]
    assert single_host_replicas(plan) == [0, 1]
    assert plan.spares == ()
    plan = make_plan(members_on(["hostA"] * 4 + ["hostB"]), 2)
    assert plan.spares == (4,)


def test_split_replica_crosses_the_network_once():
    # 3 stages over two hosts of 2: one replica spans both, entering each host once.
    plan = make_plan(members_on(["hostA", "hostB", "hostA", "hostB"]), 3)
    assert plan.num_replicas == 1
    assert plan.replica_ranks(0) == (0, 2, 1)
    assert replica_hosts(plan, 0) == ["hostA", "hostA", "hostB"]
    assert plan.spares == (3,)


def test_split_replicas_keep_large_leftovers_for_the_next_one():
    # Leftovers of 3, 3, 1, 1 for 4 stages: pairing 3+1 twice uses 2 hosts per replica
    # where cutting in order (3+1 from B, then 2+1+1) would use 3.
    hosts = ["hostA"] * 3 + ["hostB"] * 3 + ["hostC"] + ["hostD"]
    plan = make_plan(members_on(hosts), 4)
    assert plan.num_replicas == 2
    assert [sorted(set(replica_hosts(plan, i))) for i in range(2)] == [
        ["hostA", "hostC"], ["hostB", "hostD"]]
    assert plan.replica_ranks(0) == (0, 1, 2, 6)
    assert plan.replica_ranks(1) == (3, 4, 5, 7)


def test_one_stage_every_rank_drives_its_own_replica():
    plan = make_plan(members_on(["hostA", "hostB", "hostA"]), 1)
    assert plan.num_replicas == 3
    assert all(role.is_driver for role in plan.roles)
    assert plan.stage_ranks(0) == (0, 1, 2)


# --- printing ---------------------------------------------------------------------------------

def test_str_is_a_readable_table():
    plan = make_plan(members_on(["hostA", "hostA", "hostB", "hostB", "hostB"]), 2)
    text = str(plan)
    assert text.splitlines() == [
        "plan: 2 stages x 2 replicas, 1 spare",
        "replica 0: stage0=rank0@hostA  stage1=rank1@hostA  (driver rank0)",
        "replica 1: stage0=rank2@hostB  stage1=rank3@hostB  (driver rank2)",
        "spares: rank4@hostB",
    ]


def test_str_names_every_rank_and_host():
    for n, s, h, name, hosts, cap in cases():
        if cap is not None or name != "shuffled":
            continue
        text = str(make_plan(members_on(hosts), s))
        for rank, host in enumerate(hosts):
            assert f"rank{rank}@{host}" in text
        if n % s == 0:
            assert "spares: none" in text


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("members, stages, cap, words", [
    (members_on(["a"] * 2), 0, None, "num_stages"),
    (members_on(["a"] * 2), -1, None, "num_stages"),
    (members_on(["a"] * 2), 1, 0, "max_replicas"),
    ([], 1, None, "empty"),
    (members_on(["a"] * 2), 3, None, "2 members cannot host 3 stages"),
    ([Member(0, "a"), Member(0, "a")], 1, None, "duplicated: [0]"),
    ([Member(0, "a"), Member(2, "a")], 1, None, "missing: [1]"),
    ([Member(1, "a"), Member(2, "a")], 1, None, "0..1"),
])
def test_errors_name_the_problem(members, stages, cap, words):
    with pytest.raises(ValueError) as info:
        make_plan(members, stages, max_replicas=cap)
    assert words in str(info.value)


def test_plan_checks_its_invariants():
    ok = make_plan(members_on(["a", "a"]), 2)
    with pytest.raises(ValueError, match="held by both"):
        Plan(2, 1, (Role(0, 0, 0, True), Role(1, 0, 0, True)), ("a", "a"))
    with pytest.raises(ValueError, match="drivers are exactly stage 0"):
        Plan(2, 1, (Role(0, 0, 0, False), Role(1, 1, 0, False)), ("a", "a"))
    with pytest.raises(ValueError, match="ordered by rank"):
        Plan(2, 1, (ok.roles[1], ok.roles[0]), ("a", "a"))
    with pytest.raises(ValueError, match="slots filled"):
        Plan(2, 1, (Role(0, 0, 0, True), Role(1, None, None, False)), ("a", "a"))
    with pytest.raises(ValueError, match="hosts"):
        Plan(2, 1, ok.roles, ("a",))


def test_accessors_reject_out_of_range():
    plan = make_plan(members_on(["a"] * 3), 2)
    with pytest.raises(ValueError, match="rank 3 out of range"):
        plan.role(3)
    with pytest.raises(ValueError, match="stage 2 out of range"):
        plan.stage_ranks(2)
    with pytest.raises(ValueError, match="replica 1 out of range"):
        plan.replica_ranks(1)
