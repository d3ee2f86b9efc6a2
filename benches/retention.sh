#!/usr/bin/env bash
# Retention under load, against a release server on loopback:
#   1. fills a fresh data dir with 1,000,000 events (256-byte JSON, 8 topics) and inspects it;
#   2. restarts it with a rule keeping 1000 events per topic (passes every second), and measures
#      publish latency (64 connections, 256-byte events) while the passes remove the backlog,
#      against the same load on the same log without retention, run first;
#   3. inspects again: events, disk bytes and space amplification, before and after.
# Usage: bash benches/retention.sh [secs]   (server and load tool share the cores)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
port=${PORT:-17930}
addr=127.0.0.1:$port
. benches/lib.sh

dir=$(mktemp -d /tmp/tidewire-retention.XXXXXX)
on_exit() { rm -rf "$dir"; }
serve() { RUST_LOG=warn "$bin/tidewire" serve --listen "$addr" --data-dir "$dir/data" "$@" & pid=$!;
  until curl -fs "http://$addr/readyz" >/dev/null 2>&1; do sleep 0.05; done; }
halt() { kill -TERM "$pid"; wait "$pid" || true; pid=""; }
inspect() { "$bin/tidewire" inspect --data-dir "$dir/data" --json |
  python3 -c 'import json,sys; i=json.load(sys.stdin); print("events=%d disk_bytes=%d payload_bytes=%d space_amplification=%.2f chunks=%d" % (i["events"], i["disk_bytes"], i["bytes"], i["space_amplification"] or 0, i["chunks"]))'; }

TIDEWIRE_RETENTION_MAX_AGE_SECS=0 serve
bench publish --addr "$addr" --connections 4 --size 256 --batch 1000 --topics 8 --events 1000000 --duration 600 >/dev/null
halt
echo "## after filling"; inspect

echo "## publish without retention (baseline)"
TIDEWIRE_RETENTION_MAX_AGE_SECS=0 serve
bench publish --addr "$addr" --connections 64 --size 256 --duration "$secs"
halt

echo "## publish while retention trims to 1000 events per topic"
TIDEWIRE_RETENTION_MAX_AGE_SECS=0 TIDEWIRE_RETENTION_MAX_EVENTS=1000 TIDEWIRE_RETENTION_CHECK_SECS=1 serve
t0=$(date +%s%N)
bench publish --addr "$addr" --connections 64 --size 256 --duration "$secs"
curl -fs "http://$addr/metrics" | grep -E '^tidewire_retention_(removed_events_total|reclaimed_chunks_total|pass_seconds_(sum|count))'
halt
echo "elapsed_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"
echo "## after retention"; inspect
