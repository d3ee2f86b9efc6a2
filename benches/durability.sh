#!/usr/bin/env bash
# Measures what each fsync policy costs, against a release server on loopback, fresh data dir
# per run: publish req/s and latency of 256-byte JSON events from 64 connections, and events/s
# of 1000-event batches from 4 connections, under --fsync always, interval=100ms and never.
# The policies are interleaved run by run, so machine noise falls on all three alike.
# Usage: bash benches/durability.sh [secs-per-run] [runs]   (server and load tool share the cores)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
runs=${2:-3}
port=${PORT:-17910}
addr=127.0.0.1:$port
. benches/lib.sh

for run in $(seq "$runs"); do
  for policy in always interval=100ms never; do
    echo "## run $run, --fsync $policy"
    start --fsync "$policy"; bench publish --addr "$addr" --connections 64 --size 256 --duration "$secs"; stop
    start --fsync "$policy"; bench publish --addr "$addr" --connections 4 --size 256 --batch 1000 --duration "$secs"; stop
  done
done
