#!/usr/bin/env bash
# Start-up with a big log: fills a fresh data dir to 1,000,000 and then 10,000,000 events
# (256-byte JSON, 1000-event batches, 8 topics), and at each size restarts the release server
# 3 times, timing process start → first 200 from /readyz, and reports the median and the data
# dir's size on disk. Start-up must not scan the events: the time should not grow with them.
# Also times a resume of one quiet topic (100 events published first, buried under the rest):
# a long-poll from cursor 0 that returns its 100 events, which must stay instant.
# Usage: bash benches/scale.sh [sizes...]   (default: 1000000 10000000; needs ~6 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-17920}
addr=127.0.0.1:$port
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(1000000 10000000)
. benches/lib.sh

dir=$(mktemp -d /tmp/tidewire-scale.XXXXXX)
on_exit() { rm -rf "$dir"; }
stored() { curl -fs "http://$addr/v1/topics?limit=1000" | python3 -c 'import json,sys; print(sum(t["count"] for t in json.load(sys.stdin)["topics"]))'; }

first=1
for target in "${sizes[@]}"; do
  RUST_LOG=warn "$bin/tidewire" serve --listen "$addr" --data-dir "$dir/data" &
  pid=$!
  until curl -fs "http://$addr/readyz" >/dev/null 2>&1; do sleep 0.05; done
  if [ "$first" = 1 ]; then
    for i in $(seq 100); do
      curl -fs -o /dev/null -H 'content-type: application/json' -d "{\"data\":$i}" "http://$addr/v1/topics/quiet/one/events"
    done
    first=0
  fi
  # Bounded: at most 10 rounds of at most 600 s.
  for _ in $(seq 10); do
    have=$(stored)
    [ "$have" -ge "$target" ] && break
    "$bin/tidewire" bench publish --addr "$addr" --connections 4 --size 256 --batch 1000 \
      --events $((target - have)) --duration 600 >/dev/null
  done
  have=$(stored)
  kill -TERM "$pid"; wait "$pid" || true; pid=""
  times=()
  for run in 1 2 3; do
    t0=$(date +%s%N)
    RUST_LOG=warn "$bin/tidewire" serve --listen "$addr" --data-dir "$dir/data" &
    pid=$!
    until curl -fs "http://$addr/readyz" >/dev/null 2>&1; do sleep 0.005; done
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000000 )))
    kill -TERM "$pid"; wait "$pid" || true; pid=""
  done
  median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 2p)
  RUST_LOG=warn "$bin/tidewire" serve --listen "$addr" --data-dir "$dir/data" &
  pid=$!
  until curl -fs "http://$addr/readyz" >/dev/null 2>&1; do sleep 0.05; done
  quiet=$(curl -fs -o /tmp/tidewire-scale-quiet.json -w '%{time_total}' "http://$addr/v1/poll?topic=quiet/one&since=0&timeout=0&limit=1000")
  quiet_n=$(python3 -c 'import json; print(len(json.load(open("/tmp/tidewire-scale-quiet.json"))["events"]))')
  kill -TERM "$pid"; wait "$pid" || true; pid=""
  echo "quiet_topic_resume: events=$quiet_n seconds=$quiet"
  echo "events=$have startup_to_readyz_ms=[${times[*]}] median_ms=$median disk_bytes=$(du -sb "$dir/data" | cut -f1)"
done
