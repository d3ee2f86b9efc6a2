#!/usr/bin/env bash
# Runs the crash loop (tests/crash_loop.rs) for longer than the test suite does: rounds of
# concurrent publishers and live SSE/WebSocket subscribers ended by kill -9 of the real server,
# restarted on the same data dir, checking after each round that nothing acknowledged was lost,
# no id was reused, no batch was partly stored and every subscriber resumed exactly.
# Usage: bash benches/crash_loop.sh [rounds] [seed]   (default 200 rounds, a fresh seed)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-200}
export TIDEWIRE_CRASH_ROUNDS=$rounds
[ -n "${2:-}" ] && export TIDEWIRE_CRASH_SEED=$2
cargo test --release --test crash_loop -- --nocapture
