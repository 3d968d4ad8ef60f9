#!/usr/bin/env bash
# Start this host's torchrun agent for a distqat job. Run it on every host.
#
#   launch/host.sh --rdzv-endpoint HEAD:29400 [--nnodes 2:8] [--nproc-per-node 2]
#                  [--rdzv-id JOB] [--rdzv-backend c10d|etcd-v2] [--external-store]
#                  [--max-restarts N] [--config configs/tiny.yaml] [key=value ...]
#
# A thin wrapper over torchrun with the rendezvous settings measured in RECIPES.md:
# a fresh store per round (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, needed with RPC),
# 1 s last call, 1 s x 3 keep-alives. Every join or loss of a host is a new round: the
# workers restart and resume from the last outer step (--max-restarts counts rounds).
#
# Which hosts may die: with c10d the rendezvous store lives in the agent on the host that
# owns HEAD:PORT, and if that host dies every agent ends; any other host may die. With
# --external-store the store is launch/store.py on a machine that stays up, and with
# --rdzv-backend etcd-v2 it is etcd (launch/etcd.sh): then any training host may die.
#
# Stopping: SIGTERM to this script stops the whole job cleanly (`python -m distqat.status
# RUN_DIR --stop`: every host finishes the current outer step, saves and exits 0); a second
# SIGTERM, or SIGINT (Ctrl-C), stops this host at once (SIGTERM to torchrun).
set -euo pipefail
endpoint="" nnodes="1:8" nproc="1" rdzv_id="distqat" config="" backend="c10d" restarts="100"
extra_conf=""
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rdzv-endpoint) endpoint="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --nproc-per-node) nproc="$2"; shift 2 ;;
    --rdzv-id) rdzv_id="$2"; shift 2 ;;
    --rdzv-backend) backend="$2"; shift 2 ;;
    --max-restarts) restarts="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --external-store) extra_conf=",is_host=false"; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    --*) echo "launch/host.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) overrides+=("$1"); shift ;;
  esac
done
if [ -z "$endpoint" ]; then
  echo "launch/host.sh: --rdzv-endpoint HOST:PORT is required" >&2; exit 2
fi
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
args=()
[ -n "$config" ] && args+=(--config "$config")
# every check that can run before torchrun does (config, data files, device, interface):
# a user error exits 2 with one line here, not once per worker behind torchrun's report
python -m distqat.train --print-run-dir "${args[@]}" "${overrides[@]}" >/dev/null || exit $?
torchrun --nnodes="$nnodes" --nproc-per-node="$nproc" \
  --rdzv-backend="$backend" --rdzv-endpoint="$endpoint" --rdzv-id="$rdzv_id" \
  --max-restarts="$restarts" --monitor-interval=0.5 \
  --rdzv-conf=last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=120,close_timeout=5$extra_conf \
  -m distqat.train "${args[@]}" "${overrides[@]}" &
agent=$!
stopping=""
# (No `return` from the trap's function: bash then ends the script with wait's 128+signal.)
stop_job() {  # the first SIGTERM: ask the whole job to stop after its current outer step
  local run_dir asked=""
  if [ -z "$stopping" ] &&
     run_dir=$(python -m distqat.train --print-run-dir "${args[@]}" "${overrides[@]}") &&
     python -m distqat.status "$run_dir" --stop >&2; then
    asked=1
  fi
  stopping=1
  [ -n "$asked" ] || kill -TERM "$agent" 2>/dev/null || true
}
trap stop_job TERM
trap 'kill -TERM "$agent" 2>/dev/null || true' INT
# a trapped signal interrupts wait: wait again until torchrun has really ended
set +e
while kill -0 "$agent" 2>/dev/null; do wait "$agent"; done
wait "$agent"
exit $?
