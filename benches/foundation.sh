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
. benches/lib.sh

for run in 1 2 3; do start; bench publish --addr "$addr" --connections 64 --size 256 --duration "$secs"; stop; done
for run in 1 2 3; do start; bench publish --addr "$addr" --connections 4 --size 256 --batch 1000 --duration "$secs"; stop; done
start; bench fanout --addr "$addr" --subscribers 1000 --rate 100 --duration "$secs"; stop
start; bench idle --addr "$addr" --subscribers 10000 --pid "$pid" --hold 5; stop
start; bench resume --addr "$addr" --events 100000 --noise 1000000; stop
