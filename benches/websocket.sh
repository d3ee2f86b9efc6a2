#!/usr/bin/env bash
# Measures the WebSocket figures against a release server on loopback, each in a fresh data dir:
#   fan-out to 100 sockets at 1000 events/s and to 1000 sockets at 100 events/s, JSON and
#   MessagePack (published over HTTP; publish-to-receive p50/p99, delivered/expected);
#   publish-over-socket acks/s from 64 sockets (one publish in flight per socket);
#   replay of 100,000 events from since=0 on one socket, both encodings, without and with
#   batch=gzip (events/s, bytes received and after gunzip);
#   RSS per idle socket at 10,000 sockets.
# Usage: bash benches/websocket.sh [secs-per-run]   (the server and the load tool share the cores)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
port=${PORT:-17901}
addr=127.0.0.1:$port
. benches/lib.sh

for enc in json msgpack; do
  start; bench fanout --addr "$addr" --transport ws --encoding "$enc" --subscribers 100 --rate 1000 --duration "$secs"; stop
  start; bench fanout --addr "$addr" --transport ws --encoding "$enc" --subscribers 1000 --rate 100 --duration "$secs"; stop
done
start; bench publish --addr "$addr" --transport ws --connections 64 --duration "$secs"; stop
for enc in json msgpack; do
  start; bench resume --addr "$addr" --transport ws --encoding "$enc" --events 100000; stop
  start; bench resume --addr "$addr" --transport ws --encoding "$enc" --events 100000 --gzip; stop
done
start; bench idle --addr "$addr" --transport ws --subscribers 10000 --pid "$pid" --hold 5; stop
