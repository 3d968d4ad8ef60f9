#!/usr/bin/env bash
# Start a local etcd (v2 API on) for trying the etcd-v2 rendezvous on one machine:
#
#   launch/etcd.sh [--client-port 2379] [--peer-port 2380] [--data-dir DIR]
#   launch/host.sh --rdzv-backend etcd-v2 --rdzv-endpoint 127.0.0.1:2379 ...
#
# Needs Debian's etcd-server (apt-get install etcd-server) and, for torchrun,
# pip install python-etcd (the project's [etcd] extra). Runs in the foreground.
set -euo pipefail
client=2379 peer=2380 data=""
while [ $# -gt 0 ]; do
  case "$1" in
    --client-port) client="$2"; shift 2 ;;
    --peer-port) peer="$2"; shift 2 ;;
    --data-dir) data="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "launch/etcd.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! command -v etcd >/dev/null; then
  echo "launch/etcd.sh: etcd not found; install Debian's etcd-server" >&2; exit 2
fi
[ -n "$data" ] || data=$(mktemp -d)
exec etcd --name n1 --data-dir "$data" \
  --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
  --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
  --initial-cluster "n1=http://127.0.0.1:$peer" --enable-v2=true
