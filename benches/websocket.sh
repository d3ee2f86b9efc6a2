#!/usr/bin/env bash
# Measures the WebSocket figures against a release server on loopback, each in a fresh data dir:
#   fan-out to 100 sockets at 1000 events/s and to 1000 sockets at 100 events/s, JSON and
#   MessagePack (published over HTTP; publish-to-receive p50/p99, delivered/expected);
#   publish-over-socket acks/s from 64 sockets (one publish in flight per socket);
#   replay of 100,000 events from since=0 on one socket, both encodings, without and with
#   batch=gzip (events/s, payload and wire bytes);
#   RSS per idle socket at 10,000 sockets.
# Usage: bash benches/websocket.sh [secs-per-run]   (the server and the load tool share the cores)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
port=${PORT:-17901}
addr=127.0.0.1:$port
cargo build -q --release
# Snapshot both binaries, so a rebuild in the tree during the runs changes nothing measured.
bin=$(mktemp -d /tmp/tidewire-bench-bin.XXXXXX)
cp target/release/tidewire "$bin/tidewire"
loadbin=$(cargo bench -q --bench load --no-run --message-format=json 2>/dev/null |
  grep -o '"executable":"[^"]*load-[^"]*"' | tail -1 | cut -d'"' -f4)
cp "$loadbin" "$bin/load"
echo "# $(date -u +%FT%TZ) $(nproc) cores, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
load() {
  echo "\$ load $* --addr $addr    # load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$bin/load" "$@" --addr "$addr"
}

pid=""
start() {
  dir=$(mktemp -d /tmp/tidewire-bench.XXXXXX)
  RUST_LOG=warn "$bin/tidewire" serve --listen "$addr" --data-dir "$dir/data" &
  pid=$!
  for _ in $(seq 100); do
    curl -fs "http://$addr/readyz" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "server did not become ready" >&2; exit 1
}
stop() { kill -TERM "$pid"; wait "$pid" || true; pid=""; rm -rf "$dir"; }
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; rm -rf "$bin"' EXIT

for proto in json msgpack; do
  start; load ws-fanout --subs 100 --rate 1000 --secs "$secs" --proto "$proto"; stop
  start; load ws-fanout --subs 1000 --rate 100 --secs "$secs" --proto "$proto"; stop
done
start; load ws-publish --conns 64 --secs "$secs"; stop
start; load ws-replay --events 100000; stop
start; load ws-replay --events 100000 --gzip; stop
start; load ws-idle --subs 10000 --pid "$pid" --hold 5; stop
