#!/usr/bin/env bash
# tidewire side by side with nginx + Nchan, the server a user would otherwise pick, in one run on
# one machine, with the same load tool and the same command line for both (`tidewire bench …`;
# only --target and the address differ), then one table: each metric's median over the runs for
# both servers, the ratio tidewire/Nchan, the target of issue 8 and whether it is met.
#
#   publish, 256-byte JSON events, 64 connections, 10 s (tidewire: default --fsync always,
#     every 201 after its fsync; Nchan keeps messages in shared memory only): req/s, p50, p99
#   batch ingest, 1000-event gzip NDJSON batches, 4 connections (tidewire only): events/s stored
#   SSE fan-out, 1000 subscribers x 100 events/s, 10 s: delivered/expected, p50, p99
#   SSE fan-out, 1000 subscribers x 1000 events/s offered, 10 s: delivered events/s
#   WebSocket fan-out, 100 sockets x 1000 events/s (tidewire JSON and MessagePack; Nchan's raw
#     text frames): p50, p99, delivered
#   long-poll, 100 pollers x 1000 events/s (Nchan: /lp, every message newer than the poller's
#     cursor in one answer): delivered events/s, lost
#   idle memory per SSE subscriber and per WebSocket at 10,000: server RSS growth / N (Nchan:
#     the sum over its worker processes, found as children of the nginx master)
#   resume: replay 100,000 events of one topic over SSE from the start: events/s
#   start-up to /readyz with 10,000,000 events stored (tidewire only; the log is built once per
#     invocation with batch publishes): three starts per run, the first of each run shown
#     apart (it follows minutes of other loads, so it may find a cold cache or a busy disk)
#   what durability costs: publish and WebSocket fan-out again on a tidewire started with
#     `--fsync never` (acknowledged and delivered before any fsync, like Nchan's memory), in a
#     table of their own; the targets are judged on the default, `--fsync always`, only
#
# How the 2 cores are shared: nothing is pinned. One server runs at a time (the other is stopped)
# and it and the load tool share all cores as the kernel schedules them; Nchan runs 2 worker
# processes (benches/nchan.conf), tidewire's runtime one worker thread per core, the load tool a
# multi-threaded runtime too. Every measurement starts a fresh server (a fresh tidewire data dir,
# a fresh nginx), and within a run the servers alternate metric by metric, the order flipping
# from run to run, so drift on a noisy machine falls on both alike. Each raw JSON line carries
# the load tool's own CPU (tool_cpu_pct, % of one core) and the server's (server_cpu_pct): a
# figure where the tool used close to all cores (200% on 2) may be the tool's limit, not the
# server's.
#
# Offered rates: publishers send event i at start + i/rate, one request in flight per connection
# (16), each event stamped with its send time. A server whose publishes slow down under fan-out
# (Nchan with many SSE subscribers does) gets fewer events than planned within 3 x the duration
# + 10 s; the published/planned rows show it, and delivered/s counts what was delivered.
#
# Raw results: benches/results/<UTC date-time>/run-<k>.jsonl (one line per measurement:
# {"metric","server","run","report":<tidewire bench --json>}, the start-up times as metric
# "startup"), startup-build.json (the log's build), env.txt (machine, versions), table.txt.
#
# METRICS=publish,ws-json (comma-separated metric names as in the raw lines; `startup` for the
# start-up log) measures only those: a focused rerun of the figures a change is about.
#
# Usage: bash benches/compare.sh [--quick] [RUNS]   (default 3 runs; --quick: 3 s loads,
#        smaller counts, a 1,000,000-event start-up log: a smoke test, not a measurement)
# Needs: apt-get (nginx, libnginx-mod-nchan are installed when missing), curl, python3, and for
# the full run ~8 GB free under $TMPDIR (the 10,000,000-event log; STARTUP_EVENTS=N builds a
# smaller one, and with too little space the start-up metric is skipped). PORT and NCHAN_PORT
# choose the loopback ports (17960, 17961).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3
quick=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    '' | *[!0-9]*) echo "usage: bash benches/compare.sh [--quick] [RUNS]" >&2; exit 2 ;;
    *) runs=$arg ;;
  esac
done
[ "$runs" -ge 1 ] || { echo "RUNS must be at least 1" >&2; exit 2; }

if [ "$quick" = 1 ]; then
  secs=3; subs=200; socks=50; pollers=50; idle=1000; replay=20000; startup_events=1000000
else
  secs=10; subs=1000; socks=100; pollers=100; idle=10000; replay=100000; startup_events=10000000
fi
# The start-up log's size can be lowered (e.g. on a small disk): STARTUP_EVENTS=1000000.
startup_events=${STARTUP_EVENTS:-$startup_events}
port=${PORT:-17960}
nchan_port=${NCHAN_PORT:-17961}
addr=127.0.0.1:$port
nchan_addr=127.0.0.1:$nchan_port
tmp=${TMPDIR:-/tmp}

if [ ! -x /usr/sbin/nginx ] || [ ! -f /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -q --no-install-recommends nginx libnginx-mod-nchan ||
    { $sudo_cmd apt-get update -q && $sudo_cmd apt-get install -y -q --no-install-recommends nginx libnginx-mod-nchan; }
fi
# 10,000 idle connections need as many descriptors in the load tool and in the server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((idle + 1000)) ]; then
  echo "ulimit -n is $(ulimit -n): the idle tests need $((idle + 1000)) descriptors" >&2
  exit 1
fi

. benches/lib.sh

results=benches/results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$results"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "cores: $(nproc); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "nginx: $(/usr/sbin/nginx -v 2>&1); nchan: $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo unknown)"
  echo "runs: $runs; quick: $quick; ulimit -n: $(ulimit -n)"
} > "$results/env.txt"
cat "$results/env.txt"

# ---- nginx + Nchan, unprivileged, on a loopback port, from benches/nchan.conf ----
nginx_pid=""
workers=""
ndir=""
start_nchan() {
  ndir=$(mktemp -d "$tmp/tidewire-nchan.XXXXXX")
  chmod 755 "$ndir"
  sed -e "s#@PREFIX@#$ndir#g" -e "s#@PORT@#$nchan_port#g" benches/nchan.conf > "$ndir/nginx.conf"
  /usr/sbin/nginx -p "$ndir" -c "$ndir/nginx.conf" -e "$ndir/error.log" 2>>"$ndir/error.log" &
  nginx_pid=$!
  for _ in $(seq 100); do
    # The master's children (read from /proc: no procps needed) are the workers.
    # (awk fails on a process that exits between the glob and the read: not an error here.)
    workers=$({ awk -v p="$nginx_pid" '$2 == "(nginx)" && $4 == p { print $1 }' /proc/[0-9]*/stat 2>/dev/null || true; } | paste -sd, -)
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://$nchan_addr/pub?id=ready" 2>/dev/null || true)
    if [ -n "$workers" ] && [ "$(tr ',' '\n' <<<"$workers" | wc -l)" -ge 2 ] && [ "$code" != 000 ]; then
      return
    fi
    sleep 0.1
  done
  echo "nginx + Nchan did not start:" >&2; cat "$ndir/error.log" >&2; exit 1
}
stop_nchan() { kill -TERM "$nginx_pid"; wait "$nginx_pid" || true; nginx_pid=""; workers=""; rm -rf "$ndir"; ndir=""; }
startup_dir=""
on_exit() {
  if [ -n "$nginx_pid" ]; then kill -TERM "$nginx_pid" 2>/dev/null; wait "$nginx_pid" 2>/dev/null; fi
  [ -n "$ndir" ] && rm -rf "$ndir"
  # A tidewire interrupted mid-measurement (lib.sh's trap sent it SIGTERM): its data dir too.
  if [ -n "$pid" ]; then wait "$pid" 2>/dev/null; [ -n "${dir:-}" ] && rm -rf "$dir"; fi
  [ -n "$startup_dir" ] && rm -rf "$startup_dir"
  :
}

# ---- one measurement: a fresh server, one `tidewire bench … --json`, the server stopped ----
raw=""
run=0
# measure METRIC SERVER BENCH-ARGS...: appends {"metric","server","run","report"} to $raw.
measure() {
  local metric=$1 server=$2 out
  shift 2
  echo "## run $run, $metric, $server: tidewire bench $*    # load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  if out=$("$bin/tidewire" bench "$@" --json) && [ -n "$out" ]; then
    printf '{"metric":"%s","server":"%s","run":%d,"report":%s}\n' "$metric" "$server" "$run" "$out" >> "$raw"
  else
    echo "## $metric on $server failed" >&2
    printf '{"metric":"%s","server":"%s","run":%d,"report":null}\n' "$metric" "$server" "$run" >> "$raw"
  fi
}
# wanted METRIC: whether METRICS (when set) names it.
wanted() { [ -z "${METRICS:-}" ] || [[ ",$METRICS," == *",$1,"* ]]; }
# on SERVER METRIC MODE BENCH-ARGS...: the same command against a fresh tidewire or nginx.
on() {
  local server=$1 metric=$2 mode=$3
  shift 3
  wanted "$metric" || return 0
  if [ "$server" = tidewire ]; then
    start
    measure "$metric" tidewire "$mode" --addr "$addr" --pid "$pid" "$@"
    stop
  elif [ "$server" = tidewire-fsync-never ]; then
    start --fsync never
    measure "$metric" "$server" "$mode" --addr "$addr" --pid "$pid" "$@"
    stop
  else
    start_nchan
    measure "$metric" nchan "$mode" --target nchan --addr "$nchan_addr" --pid "$workers" "$@"
    stop_nchan
  fi
}
# both METRIC MODE BENCH-ARGS...: on each server, in this run's order.
both() { for s in $order; do on "$s" "$@"; done; }

# ---- the start-up log, built once: batch publishes into a data dir kept for the runs ----
startup_dir=$(mktemp -d "$tmp/tidewire-startup.XXXXXX")
need_kib=$((startup_events / 1000 * 800))
free_kib=$(df -Pk "$startup_dir" | awk 'NR == 2 { print $4 }')
startup=1
if ! wanted startup; then
  startup=0
elif [ "$free_kib" -lt "$need_kib" ]; then
  echo "## start-up: only $((free_kib / 1024)) MiB free under $tmp, $((need_kib / 1024)) MiB needed: skipped" >&2
  startup=0
else
  echo "## start-up: building a log of $startup_events events" >&2
  RUST_LOG=warn "$bin/tidewire" serve --listen "$addr" --data-dir "$startup_dir/data" &
  pid=$!
  until curl -fs "http://$addr/readyz" >/dev/null 2>&1; do sleep 0.05; done
  t0=$(date +%s%N)
  "$bin/tidewire" bench publish --addr "$addr" --connections 4 --size 256 --batch 1000 \
    --format ndjson --gzip --topics 8 --events "$startup_events" --duration 600 --json \
    > "$results/startup-build.json"
  echo "## start-up log built in $(( ($(date +%s%N) - t0) / 1000000 )) ms: $(cat "$results/startup-build.json")" >&2
  kill -TERM "$pid"; wait "$pid" || true; pid=""
fi
# Process start to the first 200 from /readyz, in ms, on the start-up log; then, after a
# space, how much of it the log's open took (from the server's "tidewire ready" line).
time_start() {
  local t0 t1 log
  log=$(mktemp "$tmp/tidewire-start.XXXXXX")
  t0=$(date +%s%N)
  RUST_LOG=info "$bin/tidewire" serve --listen "$addr" --data-dir "$startup_dir/data" 2>"$log" &
  pid=$!
  for _ in $(seq 6000); do
    curl -fs "http://$addr/readyz" >/dev/null 2>&1 && break
    sleep 0.005
  done
  t1=$(date +%s%N)
  kill -TERM "$pid"; wait "$pid" || true; pid=""
  echo "$(( (t1 - t0) / 1000000 )) $(sed -n 's/.*tidewire ready.* open_ms=\([0-9]*\).*/\1/p' "$log" | head -1)"
  rm -f "$log"
}

for run in $(seq "$runs"); do
  raw=$results/run-$run.jsonl
  : > "$raw"
  if [ $((run % 2)) = 1 ]; then order="tidewire nchan"; else order="nchan tidewire"; fi
  echo "## run $run of $runs ($order)" >&2
  both publish publish --connections 64 --size 256 --duration "$secs"
  on tidewire-fsync-never publish publish --connections 64 --size 256 --duration "$secs"
  on tidewire batch publish --connections 4 --size 256 --batch 1000 --format ndjson --gzip --duration "$secs"
  both sse100 fanout --transport sse --subscribers "$subs" --rate 100 --duration "$secs"
  both sse1000 fanout --transport sse --subscribers "$subs" --rate 1000 --duration "$secs" --grace 5s
  for s in $order; do
    if [ "$s" = tidewire ]; then
      on tidewire ws-json fanout --transport ws --encoding json --subscribers "$socks" --rate 1000 --duration "$secs"
      on tidewire ws-msgpack fanout --transport ws --encoding msgpack --subscribers "$socks" --rate 1000 --duration "$secs"
    else
      on nchan ws-json fanout --transport ws --subscribers "$socks" --rate 1000 --duration "$secs"
    fi
  done
  on tidewire-fsync-never ws-json fanout --transport ws --encoding json --subscribers "$socks" --rate 1000 --duration "$secs"
  both poll fanout --transport poll --subscribers "$pollers" --rate 1000 --duration "$secs"
  both idle-sse idle --transport sse --subscribers "$idle" --hold 5s
  both idle-ws idle --transport ws --subscribers "$idle" --hold 5s
  both resume resume --transport sse --events "$replay"
  if [ "$startup" = 1 ]; then
    starts=(); opens=()
    for _ in 1 2 3; do
      read -r ms open_ms < <(time_start)
      starts+=("$ms"); opens+=("${open_ms:-null}")
    done
    echo "## run $run, start-up with $startup_events events: ${starts[*]} ms (log open: ${opens[*]} ms)" >&2
    printf '{"metric":"startup","server":"tidewire","run":%d,"report":{"events":%d,"starts_ms":[%s],"open_ms":[%s]}}\n' \
      "$run" "$startup_events" "$(IFS=,; echo "${starts[*]}")" "$(IFS=,; echo "${opens[*]}")" >> "$raw"
  fi
done

python3 - "$results" <<'PY' | tee "$results/table.txt"
import glob, json, os, statistics, sys

results = sys.argv[1]
lines = []
for path in sorted(glob.glob(os.path.join(results, "run-*.jsonl"))):
    lines += [json.loads(l) for l in open(path) if l.strip()]

def reports(metric, server):
    return [l["report"] for l in lines if l["metric"] == metric and l["server"] == server and l["report"]]

def med(metric, server, key):
    vals = [r[key] for r in reports(metric, server) if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None

def fmt(v):
    if v is None:
        return "-"
    if float(v).is_integer() or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}"

def shape(metric):
    """'1000 subs x 100/s' from the reports themselves (quick runs use smaller counts)."""
    rs = reports(metric, "tidewire") or reports(metric, "nchan")
    if not rs:
        return metric
    r = rs[0]
    return f"{r['subscribers']:,} x {r['rate']:,}/s"

rows = []
def row(label, metric, key, target="", met=None, nchan_metric=None, show=None, tidewire_only=False):
    t = med(metric, "tidewire", key)
    n = None if tidewire_only else med(nchan_metric or metric, "nchan", key)
    ratio = f"{t / n:.2f}x" if t is not None and n not in (None, 0) else "-"
    ok = "-" if met is None else ("yes" if (t is not None and met(t, n)) else "no")
    if show:
        tt, nn = show("tidewire", metric), show("nchan", nchan_metric or metric)
    else:
        tt, nn = fmt(t), fmt(n)
    if tidewire_only:
        nn = "n/a"
    rows.append((label, tt, nn, ratio, target or "-", ok))

def ratio_of(num, den):
    def show(server, metric):
        rs = reports(metric, server)
        if not rs:
            return "-"
        return f"{statistics.median(r[num] for r in rs):,.0f}/{statistics.median(r[den] for r in rs):,.0f}"
    return show

def all_delivered(metric, server="tidewire"):
    rs = reports(metric, server)
    return bool(rs) and all(r["lost"] == 0 and r["publish_errors"] == 0 for r in rs)

kb = 8 * 1024
delivered, published = ratio_of("delivered", "expected"), ratio_of("published", "planned")
row("publish 256 B JSON, 64 conns: req/s", "publish", "req_per_s", ">= 1.5x Nchan", lambda t, n: n is not None and t >= 1.5 * n)
row("publish: p50 ms", "publish", "p50_ms")
row("publish: p99 ms", "publish", "p99_ms", "<= Nchan", lambda t, n: n is not None and t <= n)
row("batch ingest 1000-event gzip NDJSON: events/s", "batch", "events_per_s", ">= 500,000", lambda t, n: t >= 500_000, tidewire_only=True)
s = "SSE " + shape("sse100")
row(s + ": published/planned", "sse100", "published", show=published)
row(s + ": delivered/expected", "sse100", "delivered", "every event", lambda t, n: all_delivered("sse100"), show=delivered)
row(s + ": p50 ms", "sse100", "p50_ms")
row(s + ": p99 ms", "sse100", "p99_ms", "<= 1/2 Nchan", lambda t, n: n is not None and t <= n / 2)
s = "SSE " + shape("sse1000") + " offered"
row(s + ": published/planned", "sse1000", "published", show=published)
row(s + ": delivered/s", "sse1000", "delivered_per_s", ">= 2x Nchan", lambda t, n: n is not None and t >= 2 * n)
s = "WS " + shape("ws-json")
row(s + ": delivered/expected", "ws-json", "delivered", show=delivered)
row(s + ": p50 ms", "ws-json", "p50_ms")
row(s + ": p99 ms", "ws-json", "p99_ms", "<= Nchan", lambda t, n: n is not None and t <= n)
row(s + " MessagePack (Nchan: raw): delivered/expected", "ws-msgpack", "delivered", nchan_metric="ws-json", show=delivered)
row(s + " MessagePack (Nchan: raw): p99 ms", "ws-msgpack", "p99_ms", "<= Nchan", lambda t, n: n is not None and t <= n, nchan_metric="ws-json")
s = "long-poll " + shape("poll")
row(s + ": delivered/expected", "poll", "delivered", show=delivered)
# Deliveries over the time to the last receipt: a server that fell behind the offered rate and
# caught up after the publishers stopped shows it here even when nothing was lost.
row(s + ": delivered/s", "poll", "delivered_per_s", ">= Nchan", lambda t, n: n is not None and t >= n)
row(s + ": lost", "poll", "lost", "none lost", lambda t, n: all_delivered("poll"))
idle = reports("idle-sse", "tidewire") or reports("idle-sse", "nchan")
at = f" at {idle[0]['subscribers']:,}" if idle else ""
row("idle SSE" + at + ": bytes per subscriber", "idle-sse", "rss_per_conn_bytes", "<= 8 KB", lambda t, n: t <= kb)
row("idle WebSocket" + at + ": bytes per socket", "idle-ws", "rss_per_conn_bytes", "<= 8 KB", lambda t, n: t <= kb)
rs = reports("resume", "tidewire")
at = f" {rs[0]['events']:,} events" if rs else ""
row("resume" + at + " of 1 topic over SSE: events/s", "resume", "events_per_s", ">= 500,000", lambda t, n: t >= 500_000)

starts = reports("startup", "tidewire")
if starts:
    # Each run's first start follows minutes of other loads (its pages may have left the cache,
    # the disk may be busy): every one is shown, and the target is judged on the slowest.
    firsts = [r["starts_ms"][0] for r in starts]
    later = [ms for r in starts for ms in r["starts_ms"][1:]]
    n_ev = starts[0]["events"]
    shown = " / ".join(f"{ms:,}" for ms in firsts)
    rows.append((f"start-up to /readyz, {n_ev:,} events: first of each run, ms", shown, "n/a", "-", "< 1 s", "yes" if max(firsts) < 1000 else "no"))
    if later:
        m = statistics.median(later)
        rows.append((f"start-up to /readyz, {n_ev:,} events: median of later, ms", fmt(m), "n/a", "-", "< 1 s", "yes" if max(later) < 1000 else "no"))

runs = sorted({l["run"] for l in lines})
print(f"\ntidewire vs nginx + Nchan: medians of {len(runs)} run(s); ratio = tidewire / Nchan")
head = ("metric", "tidewire", "Nchan", "ratio", "target", "met")
widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(6)]
line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
print(line(head))
print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
for r in rows:
    print(line(r))

print("\nCPU, % of one core, median (tidewire / Nchan); a load tool near 100 x cores may be the limit:")
for metric in ["publish", "batch", "sse100", "sse1000", "ws-json", "ws-msgpack", "poll", "idle-sse", "idle-ws", "resume"]:
    t, n = med(metric, "tidewire", "tool_cpu_pct"), med(metric, "nchan", "tool_cpu_pct")
    ts, ns = med(metric, "tidewire", "server_cpu_pct"), med(metric, "nchan", "server_cpu_pct")
    print(f"  {metric:<11} load tool {fmt(t):>6} / {fmt(n):>6}    server {fmt(ts):>6} / {fmt(ns):>6}")
never = "tidewire-fsync-never"
if reports("publish", never) or reports("ws-json", never):
    print("\nWhat durability costs: tidewire with --fsync never (acks and deliveries before any fsync,")
    print("as Nchan's memory-only messages; not the default, and not what the targets are judged on):")
    for label, metric, key in [("publish: req/s", "publish", "req_per_s"), ("publish: p99 ms", "publish", "p99_ms"),
                               ("WS JSON: p50 ms", "ws-json", "p50_ms"), ("WS JSON: p99 ms", "ws-json", "p99_ms")]:
        a, t, n = med(metric, never, key), med(metric, "tidewire", key), med(metric, "nchan", key)
        r = f"{a / n:.2f}x" if a is not None and n else "-"
        print(f"  {label:<15} fsync never {fmt(a):>8}   always {fmt(t):>8}   Nchan {fmt(n):>8}   never/Nchan {r}")
failed = [f"{l['metric']}/{l['server']}/run {l['run']}" for l in lines if l["report"] is None]
if failed:
    print("\nfailed measurements: " + ", ".join(failed))
PY
echo "raw results: $results"
