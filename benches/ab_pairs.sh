#!/usr/bin/env bash
# Alternating pairs of one `tidewire bench` command against two server binaries (A then B, the
# order flipping per pair), each measurement on a fresh server and data dir: the way to judge
# one change on a shared, noisy machine (compare within a pair, not across pairs).
#
# Usage: bash benches/ab_pairs.sh A_BIN B_BIN PAIRS OUT.jsonl -- BENCH-ARGS...
#        e.g. bash benches/ab_pairs.sh /tmp/tw-before /tmp/tw-after 3 /tmp/pub.jsonl -- \
#               publish --connections 64 --size 256 --duration 8s
# SERVE_FLAGS: extra `serve` flags for both (e.g. "--fsync never"); PORT: loopback port (17990).
# The load tool is B's `tidewire bench`. One JSON line per measurement:
# {"which":"A"|"B","pair":N,"load":"<1-min load average>","report":<bench --json>}.
set -euo pipefail
a=$1 b=$2 pairs=$3 out=$4
shift 4
[ "${1:-}" = "--" ] && shift
port=${PORT:-17990}
: > "$out"
pid=""
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' EXIT
for p in $(seq "$pairs"); do
  if [ $((p % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for which in $order; do
    if [ "$which" = A ]; then bin=$a; else bin=$b; fi
    dir=$(mktemp -d /tmp/tidewire-ab.XXXXXX)
    # shellcheck disable=SC2086
    RUST_LOG=warn "$bin" serve --listen "127.0.0.1:$port" --data-dir "$dir/data" ${SERVE_FLAGS:-} &
    pid=$!
    until curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do sleep 0.05; done
    r=$("$b" bench "$@" --addr "127.0.0.1:$port" --pid "$pid" --json)
    printf '{"which":"%s","pair":%d,"load":"%s","report":%s}\n' \
      "$which" "$p" "$(cut -d' ' -f1 /proc/loadavg)" "$r" >> "$out"
    kill -TERM "$pid"; wait "$pid" || true; pid=""
    rm -rf "$dir"
  done
done
