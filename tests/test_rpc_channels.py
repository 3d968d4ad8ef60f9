"""``comm.rpc_channels``: ``single`` leaves TensorPipe's multiplexed channel out.

``mpt_uv`` cuts every tensor sent to another host into 16 parts on 16 TCP connections of
their own, each behind a listener of its own; over slow links with short queues those 16
flows start at once and overflow it (BENCHMARKS.md). Without it a worker listens on a few
ports, not on 16 more, and tensors still arrive whole."""

from __future__ import annotations

import psutil
import torch
import torch.distributed.rpc as rpc

from distqat.elastic import dist as dq_dist
from mp import rank_store, run_ranks

MPT_LANES = 16  # torch's kNumUvThreads: mpt_uv's connections, one listener each


def _listeners_after_a_tensor(rank: int, world: int, channels: str):
    env = dq_dist.DistEnv(rank=rank, world_size=world, local_rank=0, master_addr="127.0.0.1",
                          master_port=0, restart_count=0)
    dq_dist.init_rpc(env, rank_store("rpc"), num_threads=4, rpc_timeout=60, init_timeout=60,
                     transport="uv", channels=channels)
    try:
        sent = torch.arange(1 << 18, dtype=torch.float32)  # 1 MB
        got = (rpc.rpc_sync(dq_dist.worker_name(1), torch.add, args=(sent, 1.0))
               if rank == 0 else None)
        ok = got is None or torch.equal(got, sent + 1)
        listening = sum(c.status == psutil.CONN_LISTEN
                        for c in psutil.Process().net_connections(kind="tcp"))
        return ok, listening
    finally:
        rpc.shutdown()


def test_single_channel_opens_none_of_the_multiplexed_lanes():
    single = run_ranks(_listeners_after_a_tensor, 2, "single")
    multiplexed = run_ranks(_listeners_after_a_tensor, 2, "multiplexed")
    assert all(ok for ok, _ in single + multiplexed)
    for (_, one), (_, many) in zip(single, multiplexed):
        assert many - one >= MPT_LANES, (one, many)
