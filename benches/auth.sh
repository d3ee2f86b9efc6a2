#!/usr/bin/env bash
# Publish throughput with authorization off vs on, same command, same run: 256-byte JSON events
# from 64 connections (durable acks) against a release server on loopback, each run in a fresh
# data dir, interleaved off/on three times so drift on a shared machine hits both alike.
#   off: no key (an open server on loopback);
#   on:  --jwt-secret-file with a random 32-byte (64 hex chars) secret, every request carrying
#        `Authorization: Bearer` a token from `tidewire token --secret-file F --publish '**' --ttl 1h`
#        (HS256: the server verifies the signature and checks the grant on each publish).
# Prints each run's line, then the medians of req/s and p50/p99.
# Usage: bash benches/auth.sh [secs-per-run]   (the server and the load tool share the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
port=${PORT:-17930}
addr=127.0.0.1:$port
. benches/lib.sh

secret_dir=$(mktemp -d /tmp/tidewire-bench-secret.XXXXXX)
on_exit() { rm -rf "$secret_dir"; }
secret_file=$secret_dir/jwt-secret
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret_file")
token=$("$bin/tidewire" token --secret-file "$secret_file" --publish '**' --ttl 1h)

results=$(mktemp "$secret_dir/results.XXXXXX")
for run in 1 2 3; do
  start
  load publish --addr "$addr" --conns 64 --size 256 --secs "$secs" | tee -a "$results"
  stop
  start --jwt-secret-file "$secret_file"
  # The token is printed by `load` below: a throwaway, for this run's random secret only.
  load publish --addr "$addr" --conns 64 --size 256 --secs "$secs" --token "$token" | tee -a "$results"
  stop
done

# Medians over the three runs of each: req_per_s, p50_ms, p99_ms (and the errors, summed).
median() { sort -g | sed -n 2p; }
field() { grep -o " $1=[^ ]*" | cut -d= -f2; }
for mode in off on; do
  if [ "$mode" = on ]; then lines=$(grep 'auth=bearer' "$results"); else lines=$(grep -v 'auth=bearer' "$results"); fi
  echo "median auth=$mode req_per_s=$(field req_per_s <<<"$lines" | median)" \
    "p50_ms=$(field p50_ms <<<"$lines" | median) p99_ms=$(field p99_ms <<<"$lines" | median)" \
    "errors=$(field errors <<<"$lines" | awk '{s += $1} END {print s}')"
done
