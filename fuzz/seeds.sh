#!/usr/bin/env bash
# fuzz/seeds.sh: (re)writes the seed corpus fuzz/corpus/<target>/ with examples/seeds.rs.
#
# The example is built with the flags `cargo fuzz build` (cargo-fuzz 0.13.2, AddressSanitizer)
# passes, so it reuses the instrumented dependencies of the fuzz targets instead of building
# tidewire once more; run fuzz/run.sh (or `cargo fuzz build`) first.
set -euo pipefail
cd "$(dirname "$0")"
triple="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Zsanitizer=address \
-Cllvm-args=-sanitizer-coverage-stack-depth -Cdebug-assertions -Ccodegen-units=1"
cargo build --release --target "$triple" --config 'profile.release.debug="line-tables-only"' \
  --example seeds
ASAN_OPTIONS=detect_odr_violation=0 "target/$triple/release/examples/seeds"
