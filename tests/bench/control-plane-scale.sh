#!/usr/bin/env bash
# The control plane at scale (issue 17 goal 6): 10 000 endpoints in 100
# services and 1000 watching sidecars (simulated: the watch protocol over
# TLS, one connection each) against a real `control-plane` process on
# loopback. A policy apply and a new registration are timed to their
# arrival at every watcher (p50/p99/max, the fan-out from the first watcher
# to the last); also the full snapshot served to one new watcher and the
# control plane's RSS, each next to a baseline of 100 endpoints and 10
# watchers measured in the same run.
#
# Usage: tests/bench/control-plane-scale.sh [meshlet-cp-scale flags]
#        (--endpoints N --services N --watchers N --rounds N; see --help)
# Output: a markdown fragment on stdout (progress on stderr), also written
# to target/bench/control-plane-scale.md. Exit 0 on success.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

# 1000 watchers plus the registrations need descriptors on both sides.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release --bins -q >&2
mkdir -p target/bench

# The bench binary kills its control plane and removes its data directory
# when it exits or gets SIGINT/SIGTERM; the trap forwards ours to it.
BENCH_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$BENCH_PID" ]] && kill -0 "$BENCH_PID" 2>/dev/null; then
        kill -TERM "$BENCH_PID" 2>/dev/null || true
        wait "$BENCH_PID" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT INT TERM

MESHLET_BIN_DIR="$ROOT/target/release" RUST_LOG="${RUST_LOG:-warn}" \
    target/release/meshlet-cp-scale --out target/bench/control-plane-scale.md "$@" &
BENCH_PID=$!
wait "$BENCH_PID"
