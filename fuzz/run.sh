#!/usr/bin/env bash
# fuzz/run.sh [SECONDS]: build every cargo-fuzz target of fuzz/ and run each for SECONDS
# (default 25) on a scratch copy of its seed corpus (fuzz/corpus/<target>/ stays as committed).
# Fails (exit 1) when any target crashes, hangs past the timeout or runs out of memory; prints
# executions, exec/s and corpus size per target either way. Crash inputs land in
# fuzz/artifacts/<target>/ (see fuzz/README.md for turning one into a regression test).
#
# Works from a fresh clone on stable Rust: cargo-fuzz is installed if missing (pinned), and
# RUSTC_BOOTSTRAP=1 lets stable rustc take the `-Zsanitizer=address` flag cargo-fuzz passes.
# FUZZ_SANITIZER=none builds without AddressSanitizer (no RUSTC_BOOTSTRAP needed, faster).
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-25}"
case "$secs" in
  '' | *[!0-9]*) echo "usage: fuzz/run.sh [SECONDS]" >&2; exit 2 ;;
esac

cargo_fuzz_version=0.13.2
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

sanitizer="${FUZZ_SANITIZER:-address}"
build=(cargo fuzz build --sanitizer "$sanitizer")
if [ "$sanitizer" != none ]; then
  export RUSTC_BOOTSTRAP=1
fi
"${build[@]}"

triple="$(rustc -vV | sed -n 's/^host: //p')"
# cargo-fuzz builds into CARGO_TARGET_DIR when it is set (relative to fuzz/, like cargo).
bin_dir="${CARGO_TARGET_DIR:-target}/$triple/release"
targets=()
while IFS= read -r t; do targets+=("$t"); done < <(cargo fuzz list)
for t in "${targets[@]}"; do
  if [ ! -x "$bin_dir/$t" ]; then
    echo "fuzz/run.sh: the build left no $bin_dir/$t" >&2
    exit 1
  fi
done

work="$(mktemp -d "${TMPDIR:-/tmp}/tidewire-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "artifacts/$t"
  if [ -d "corpus/$t" ]; then
    cp -R "corpus/$t/." "$work/$t/"
  fi
  seeds="$(find "$work/$t" -type f | wc -l)"
  echo "== $t: ${secs}s from $seeds seeds"
  log="$work/$t.log"
  status=0
  "$bin_dir/$t" "$work/$t" \
    -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$t/" >"$log" 2>&1 || status=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
  corpus="$(find "$work/$t" -type f | wc -l)"
  if [ "$status" -ne 0 ]; then
    failed+=("$t")
    echo "!! $t failed (exit $status); the end of its log:"
    tail -n 60 "$log"
    summary+=("$(printf '%-16s %12s %8s %7s  FAILED (exit %s)' "$t" "${execs:-?}" "${rate:-?}" "$corpus" "$status")")
  else
    summary+=("$(printf '%-16s %12s %8s %7s  ok' "$t" "${execs:-?}" "${rate:-?}" "$corpus")")
  fi
  rmdir "artifacts/$t" 2>/dev/null || true
done
rmdir artifacts 2>/dev/null || true

echo
printf '%-16s %12s %8s %7s  %s\n' target executions exec/s corpus result
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found problems in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
