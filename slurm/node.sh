#!/usr/bin/env bash
# One node's torchrun agent for slurm/distqat.sbatch (srun runs this once per node).
#
#   node.sh ENDPOINT BACKEND EXTERNAL NNODES NPROC RDZV_ID [train args ...]
#
# With the c10d store on the allocation's first node (EXTERNAL=0), that node's agent hosts
# the store and every other agent is a client of it (is_host=false). Saying so explicitly
# matters where all "nodes" share one address (the test cluster, where the endpoint is
# 127.0.0.1 and every agent would otherwise try to host it): whichever hosts the store
# takes the job down when it dies, so it must be the first node, the one that also runs
# the batch script. With EXTERNAL=1 (etcd, launch/store.py) no node hosts it.
# With DISTQAT_LOG_DIR set, the agent's and its workers' output goes to
# $DISTQAT_LOG_DIR/<job id>-<node>.out (appended to, across requeues).
set -euo pipefail
[ $# -ge 6 ] || { echo "slurm/node.sh: needs ENDPOINT BACKEND EXTERNAL NNODES NPROC RDZV_ID" >&2; exit 2; }
endpoint="$1" backend="$2" external="$3" nnodes="$4" nproc="$5" rdzv_id="$6"
shift 6
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
node="${SLURMD_NODENAME:-$(hostname)}"
role=()
if [ "$external" = 1 ] || [ "${SLURM_NODEID:-0}" != 0 ]; then
  role=(--external-store)   # launch/host.sh: is_host=false, a client of the store
fi
if [ -n "${DISTQAT_LOG_DIR:-}" ]; then   # one file per node and job, across requeues
  mkdir -p "$DISTQAT_LOG_DIR"
  exec >>"$DISTQAT_LOG_DIR/${SLURM_JOB_ID:-job}-$node.out" 2>&1
fi
echo "distqat node $node (SLURM_NODEID ${SLURM_NODEID:-?}, restart ${SLURM_RESTART_COUNT:-0}):" \
     "agent for $rdzv_id at $endpoint ($backend${role:+, client}), nnodes $nnodes x $nproc" >&2
# not exec: the agent's exit status is written where the batch script reads it (srun's own
# status says "killed" as soon as any node is lost, even when the others finished the job)
bash "$here/../launch/host.sh" --rdzv-endpoint "$endpoint" --rdzv-backend "$backend" \
  --nnodes "$nnodes" --nproc-per-node "$nproc" --rdzv-id "$rdzv_id" "${role[@]}" "$@" &
agent=$!
# SLURM signals every process of the step, the agent too: this shell only waits on
trap ':' TERM
while kill -0 "$agent" 2>/dev/null; do wait "$agent" || true; done
set +e
wait "$agent"
rc=$?
echo "distqat node $node: agent exited $rc" >&2
[ -z "${DISTQAT_LOG_DIR:-}" ] ||
  echo "$rc" >"$DISTQAT_LOG_DIR/${SLURM_JOB_ID:-job}-$node.r${SLURM_RESTART_COUNT:-0}.rc"
exit "$rc"
