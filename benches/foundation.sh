#!/usr/bin/env bash
# Measures the foundation figures against a release server on loopback, each in a fresh data dir:
#   publish req/s of 256-byte JSON events from 64 connections (durable acks), 3 runs;
#   events/s for 1000-event JSON batches, 3 runs;
#   SSE delivery to 1000 subscribers at 100 events/s (publish-to-receive p50/p99);
#   RSS per idle SSE subscriber at 10,000 subscribers;
#   time to resume 100,000 missed events on one topic (behind 1,000,000 events on other topics).
# Usage: bash benches/foundation.sh [secs-per-run]   (the server and the load tool share the 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
port=${PORT:-17900}
addr=127.0.0.1:$port
cargo build -q --release
cargo bench -q --bench load --no-run 2>/dev/null
load() { cargo bench -q --bench load -- "$@" --addr "$addr"; }

pid=""
start() {
  dir=$(mktemp -d /tmp/tidewire-bench.XXXXXX)
  RUST_LOG=warn ./target/release/tidewire serve --listen "$addr" --data-dir "$dir/data" &
  pid=$!
  for _ in $(seq 100); do
    curl -fs "http://$addr/readyz" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "server did not become ready" >&2; exit 1
}
stop() { kill -TERM "$pid"; wait "$pid" || true; rm -rf "$dir"; }
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true' EXIT

for run in 1 2 3; do start; load publish --conns 64 --size 256 --secs "$secs"; stop; done
for run in 1 2 3; do start; load publish --conns 4 --size 256 --batch 1000 --secs "$secs"; stop; done
start; load fanout --subs 1000 --rate 100 --secs "$secs"; stop
start; load idle --subs 10000 --pid "$pid" --hold 5; stop
start; load resume --events 100000 --noise 1000000; stop
