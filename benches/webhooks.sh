#!/usr/bin/env bash
# Webhook delivery of one webhook to a fast local receiver (benches/webhook_sink.js: Node, which
# does NOT verify signatures; it counts events and batches and records latencies), release build.
#
# 1. Throughput: EVENTS events are published first (`tidewire bench publish`, 1000-event gzip
#    NDJSON batches over 8 topics bench/p0..7, 256-byte payloads); then a webhook with
#    `since: 0` on `bench/**` drains that backlog. Events/s and batches/s = what the sink counted
#    / (sink's last receive time − the PUT's time). RUNS runs per batch_max_events (100, 1000),
#    each with a fresh webhook over the same backlog; medians printed.
# 2. Latency at RATE events/s: a webhook (from now) on `bench/*`, then `tidewire bench fanout
#    --rate RATE` publishes single events paced over 4 connections for SECS seconds (its one SSE
#    subscriber is the tool's own check). For each event the sink records receive time − the
#    envelope's `time` (server receive time, whole ms) and receive time − the publisher's µs
#    stamp in data.ts; p50/p99/max printed. RUNS runs, medians of each percentile.
#
# Usage: bash benches/webhooks.sh [EVENTS] [RUNS] [RATE] [SECS]
#        (defaults 200000 events, 3 runs, 1000 events/s, 20 s)
#        PORT chooses the server's loopback port (default: a free one). Bounded: every wait
#        has a deadline.
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:-200000}
runs=${2:-3}
rate=${3:-1000}
secs=${4:-20}
addr=127.0.0.1:${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
. benches/lib.sh
base=http://$addr
secret="whsec_$(head -c 32 /dev/urandom | base64)"

sink_out=$(mktemp)
node benches/webhook_sink.js >"$sink_out" &
sink_pid=$!
on_exit() { kill "$sink_pid" 2>/dev/null || true; rm -f "$sink_out"; }
for _ in $(seq 50); do grep -q port "$sink_out" && break; sleep 0.1; done
sink=http://127.0.0.1:$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$sink_out")
echo "# sink: $sink (node $(node --version), no signature check)"

now_ms() { python3 -c 'import time; print(f"{time.time()*1000:.3f}")'; }
stats() { curl -fsS "$sink/stats"; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
median() { sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f", m}'; }
put_hook() {
  curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' --data-binary "$2" "$base/v1/webhooks/$1"
}
# Waits (at most $2 s) until the sink has counted $1 events.
wait_events() {
  local deadline=$((SECONDS + $2))
  while [ "$(stats | field 'd["events"]')" -lt "$1" ]; do
    [ $SECONDS -lt $deadline ] || { echo "the sink got $(stats | field 'd["events"]') of $1 events in $2 s" >&2; exit 1; }
    sleep 0.05
  done
}

start
echo "## backlog: $events events on bench/p0..7"
bench publish --addr "$addr" --connections 4 --size 256 --batch 1000 --format ndjson --gzip \
  --topics 8 --events "$events" --duration 600 --json >/dev/null
for bme in 100 1000; do
  eps=(); bps=()
  for run in $(seq "$runs"); do
    curl -fsS -o /dev/null -X POST "$sink/reset"
    name="drain-$bme-$run"
    t0=$(now_ms)
    put_hook "$name" "{\"url\":\"$sink/hook\",\"topics\":[\"bench/**\"],\"secret\":\"$secret\",\"since\":0,\"batch_max_events\":$bme}"
    wait_events "$events" 600
    read -r n b last < <(stats | field 'd["events"], d["batches"], d["last_ms"]')
    secs_taken=$(python3 -c "print(($last - $t0) / 1000)")
    eps+=("$(python3 -c "print($n / $secs_taken)")"); bps+=("$(python3 -c "print($b / $secs_taken)")")
    echo "run $run batch_max_events=$bme: $n events in $b batches in ${secs_taken} s"
    curl -fsS -o /dev/null -X DELETE "$base/v1/webhooks/$name"
  done
  echo "batch_max_events=$bme: events/s median $(printf '%s\n' "${eps[@]}" | median), batches/s median $(printf '%s\n' "${bps[@]}" | median)"
done

echo "## latency at $rate events/s for $secs s"
p50t=(); p99t=(); p50s=(); p99s=()
for run in $(seq "$runs"); do
  curl -fsS -o /dev/null -X POST "$sink/reset"
  name="latency-$run"
  put_hook "$name" "{\"url\":\"$sink/hook\",\"topics\":[\"bench/*\"],\"secret\":\"$secret\"}"
  bench fanout --addr "$addr" -n 1 --rate "$rate" --duration "${secs}s" --publishers 4 --size 256 --grace 10s --json >/dev/null
  wait_events $((rate * secs)) 60
  out=$(stats)
  echo "run $run: $(echo "$out" | field 'd["events"], "events in", d["batches"], "batches; vs time:", d["latency_time_ms"], "; vs publisher stamp:", d["latency_ts_ms"]')"
  p50t+=("$(echo "$out" | field 'd["latency_time_ms"]["p50"]')"); p99t+=("$(echo "$out" | field 'd["latency_time_ms"]["p99"]')")
  p50s+=("$(echo "$out" | field 'd["latency_ts_ms"]["p50"]')"); p99s+=("$(echo "$out" | field 'd["latency_ts_ms"]["p99"]')")
  curl -fsS -o /dev/null -X DELETE "$base/v1/webhooks/$name"
done
echo "latency at $rate/s, receive − event time (ms): p50 median $(printf '%s\n' "${p50t[@]}" | median), p99 median $(printf '%s\n' "${p99t[@]}" | median)"
echo "latency at $rate/s, receive − publisher stamp (ms): p50 median $(printf '%s\n' "${p50s[@]}" | median), p99 median $(printf '%s\n' "${p99s[@]}" | median)"
stop
