"""Noticing a member that died while nobody needed it (a spare), during the run.

A member whose death breaks a pipeline is noticed by the RPC or collective that fails. A
spare's death is noticed by nothing until the end, and then it costs minutes: every
survivor's graceful RPC shutdown waits ``rpc_timeout`` on it, and torchrun's exit barrier
waits 300 s for its agent (RECIPES.md measured 367 s). So every worker bumps a counter in
the round's store every second (``alive/<rank>``), and rank 0 (which hosts the store)
notes when each counter last moved; once one has been still for ``comm.lost_after``, rank
0 says so in the store (``lost``). The drivers then end the round after the next outer
step, agreed like a stop (:mod:`.control`), every worker leaves with an error, and the
agents meet again without the dead one: a recovery that loses no inner step, and a job
that ends promptly. A host that hangs (SIGSTOP) is treated the same way.

A member that holds a stage cannot be waited for that way: if it hangs (SIGSTOP, a
frozen machine) its replica's calls and its stage group's all-reduce block without an
error until ``rpc_timeout``. So when a lost rank holds a stage, every worker leaves the
round at once (:class:`distqat.elastic.control.JobControl` calls its ``on_broken``): the
inner steps since the last outer step are lost, as with a kill. If rank 0 itself hangs,
nobody can say so through its store; every worker then notices that its own heartbeat has
not come back for ``comm.lost_after`` and leaves the same way.

A worker that leaves normally says so first (``left/<rank>``), so the end of a round is
never mistaken for a death. Counters, not timestamps: hosts' clocks may disagree.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

ALIVE = "distqat/alive/"
LEFT = "distqat/left/"
LOST_KEY = "distqat/lost"


class Liveness:
    """One worker's heartbeat and, on rank 0, the watch over everyone else's. :meth:`poll`
    is called about once a second (by :class:`distqat.elastic.control.JobControl`)."""

    def __init__(self, store, rank: int, world_size: int, lost_after: float):
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.lost_after = lost_after
        self.moved: Dict[int, Tuple[int, float]] = {}  # rank -> (counter, when it last moved)
        self.reported = False

    def poll(self) -> None:
        self.store.add(ALIVE + str(self.rank), 1)
        if self.rank == 0 and not self.reported:
            lost = self.silent_ranks(time.monotonic())
            if lost:
                self.reported = True
                what = (f"rank(s) {', '.join(map(str, lost))} silent for more than "
                        f"{self.lost_after:.0f} s")
                log.warning("lost a member: %s", what)
                self.store.set(LOST_KEY, json.dumps({"ranks": lost, "what": what}))

    def silent_ranks(self, now: float) -> List[int]:
        """Ranks that have beaten at least once, then stopped for ``lost_after`` seconds
        without saying they left (a rank still starting up is not judged)."""
        lost = []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            count = self.store.add(ALIVE + str(rank), 0)
            seen = self.moved.get(rank)
            if seen is None or seen[0] != count:
                self.moved[rank] = (count, now)
            elif count > 0 and now - seen[1] > self.lost_after and \
                    not self.store.check([LEFT + str(rank)]):
                lost.append(rank)
        return lost

    def leave(self) -> None:
        self.store.set(LEFT + str(self.rank), "1")


def lost_members(store) -> Optional[Tuple[List[int], str]]:
    """The ranks rank 0 reported lost in this round, and what it said; or None."""
    if not store.check([LOST_KEY]):
        return None
    lost = json.loads(store.get(LOST_KEY))
    return lost["ranks"], lost["what"]
