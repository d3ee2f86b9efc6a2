#!/usr/bin/env bash
# Publish throughput with authorization off vs on, same command, same run: 256-byte JSON events
# from 64 connections (durable acks) against a release server on loopback, each run in a fresh
# data dir, interleaved off/on three times so drift on a shared machine hits both alike.
#   off: no key (an open server on loopback);
#   on:  --jwt-secret-file with a random 32-byte (64 hex chars) secret, every request carrying
#        `Authorization: Bearer` a token from `tidewire token --secret-file F --publish '**' --ttl 1h`
#        (HS256: the server verifies the signature and checks the grant on each publish).
# Prints each run's JSON report, then the medians of req/s and p50/p99.
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
  bench publish --addr "$addr" --connections 64 --size 256 --duration "$secs" --json |
    sed 's/^{/{"auth":"off",/' | tee -a "$results"
  stop
  start --jwt-secret-file "$secret_file"
  # The token is printed by `bench` below: a throwaway, for this run's random secret only.
  bench publish --addr "$addr" --connections 64 --size 256 --duration "$secs" --token "$token" --json |
    sed 's/^{/{"auth":"on",/' | tee -a "$results"
  stop
done

# Medians over the three runs of each: req_per_s, p50_ms, p99_ms (and the errors, summed).
python3 - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for mode in ("off", "on"):
    rs = [r for r in runs if r["auth"] == mode]
    med = lambda k: statistics.median(r[k] for r in rs)
    print(f"median auth={mode} req_per_s={med('req_per_s'):.0f} p50_ms={med('p50_ms')} "
          f"p99_ms={med('p99_ms')} errors={sum(r['errors'] for r in rs)}")
PY
