# Shared by the benches/*.sh scripts (sourced, not run): builds the release binary once and
# copies it aside, so a rebuild in the tree during the runs changes nothing measured; starts
# and stops a fresh server per run; runs the load tool (`tidewire bench`), printing each
# command before it runs.
# Expects: cd to the repository root, and $addr (host:port of the server) set. Honours
# $CARGO_TARGET_DIR.
cargo build -q --release
bin=$(mktemp -d /tmp/tidewire-bench-bin.XXXXXX)
cp "${CARGO_TARGET_DIR:-target}/release/tidewire" "$bin/tidewire"
echo "# $(date -u +%FT%TZ) $(nproc) cores, load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# Runs the load tool (`tidewire bench MODE ...`), printing the command and the load average
# first.
bench() {
  echo "\$ tidewire bench $*    # load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  "$bin/tidewire" bench "$@"
}

pid=""
# Starts a release server on $addr with a fresh data dir and any extra serve flags given;
# waits until /readyz answers 200.
start() {
  # Another server already answering there would be measured (and loaded) instead of ours.
  if curl -fs "http://$addr/readyz" >/dev/null 2>&1; then
    echo "something already answers on $addr: choose another PORT" >&2
    exit 1
  fi
  dir=$(mktemp -d /tmp/tidewire-bench.XXXXXX)
  RUST_LOG=warn "$bin/tidewire" serve --listen "$addr" --data-dir "$dir/data" "$@" &
  pid=$!
  for _ in $(seq 100); do
    curl -fs "http://$addr/readyz" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "server did not become ready" >&2
  exit 1
}
# Stops the server by its PID and removes its data dir.
stop() { kill -TERM "$pid"; wait "$pid" || true; pid=""; rm -rf "$dir"; }
# Extra cleanup a script wants on exit (e.g. stopping nginx).
on_exit() { :; }
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; on_exit; rm -rf "$bin"' EXIT
