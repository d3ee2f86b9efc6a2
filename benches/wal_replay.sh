#!/usr/bin/env bash
# The first start after a crash: how long a release server takes from `serve` to /readyz after a
# `kill -9` under publish load, on a log of N events, and how much write-ahead log it replayed.
#
# The log is built once with batch publishes (1000-event gzip NDJSON, 4 connections). Then, per
# run: a server on that log, 64 publishers for a random 1-3 s (so the kill lands anywhere between
# checkpoints), `kill -9`, the WAL directory's size at the kill, and a restart timed to its first
# 200 from /readyz, with the replay the server logs ("replayed the write-ahead log": records and
# events) and its open time. Medians over the runs.
#
# Usage: bash benches/wal_replay.sh [EVENTS] [RUNS]     (default 1000000 events, 5 runs)
#        PORT chooses the loopback port (17970). Needs ~0.8 GB free under $TMPDIR per million.
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:-1000000}
runs=${2:-5}
addr=127.0.0.1:${PORT:-17970}
. benches/lib.sh
tmp=${TMPDIR:-/tmp}

work=$(mktemp -d "$tmp/tidewire-wal-replay.XXXXXX")
on_exit() { rm -rf "$work"; }
data=$work/data

echo "## building a log of $events events"
RUST_LOG=warn "$bin/tidewire" serve --listen "$addr" --data-dir "$data" &
pid=$!
until curl -fs "http://$addr/readyz" >/dev/null 2>&1; do sleep 0.05; done
"$bin/tidewire" bench publish --addr "$addr" --connections 4 --size 256 --batch 1000 \
  --format ndjson --gzip --topics 8 --events "$events" --duration 600 --json >/dev/null
kill -TERM "$pid"; wait "$pid" || true; pid=""

results=()
for run in $(seq "$runs"); do
  RUST_LOG=warn "$bin/tidewire" serve --listen "$addr" --data-dir "$data" &
  pid=$!
  until curl -fs "http://$addr/readyz" >/dev/null 2>&1; do sleep 0.05; done
  load_ms=$((1000 + RANDOM % 2000))
  "$bin/tidewire" bench publish --addr "$addr" --connections 64 --size 256 --duration 10s \
    --json >/dev/null 2>&1 &
  loader=$!
  sleep "$((load_ms / 1000)).$(printf '%03d' $((load_ms % 1000)))"
  kill -9 "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  wal_bytes=$(du -sb "$data/wal" | cut -f1)
  kill -TERM "$loader" 2>/dev/null || true; wait "$loader" 2>/dev/null || true
  log=$work/start.log
  t0=$(date +%s%N)
  RUST_LOG=info "$bin/tidewire" serve --listen "$addr" --data-dir "$data" 2>"$log" &
  pid=$!
  until curl -fs "http://$addr/readyz" >/dev/null 2>&1; do sleep 0.005; done
  t1=$(date +%s%N)
  kill -TERM "$pid"; wait "$pid" || true; pid=""
  ready_ms=$(( (t1 - t0) / 1000000 ))
  open_ms=$(sed -n 's/.*tidewire ready.* open_ms=\([0-9]*\).*/\1/p' "$log" | head -1)
  replayed=$(sed -n 's/.*replayed the write-ahead log.*records=\([0-9]*\) events=\([0-9]*\).*/\1 \2/p' "$log" | head -1)
  echo "run $run: killed after ${load_ms} ms of load; WAL at the kill ${wal_bytes} bytes; ready in ${ready_ms} ms (log open ${open_ms:-?} ms); replayed records/events: ${replayed:-0 0}"
  results+=("$ready_ms ${open_ms:-0} $wal_bytes ${replayed:-0 0}")
done
printf '%s\n' "${results[@]}" | python3 -c '
import sys, statistics as st
rows = [list(map(int, l.split())) for l in sys.stdin if l.strip()]
names = ["ready ms", "log open ms", "WAL bytes at kill", "records replayed", "events replayed"]
for i, n in enumerate(names):
    print(f"median {n}: {st.median(r[i] for r in rows):g}  (max {max(r[i] for r in rows)})")
'
