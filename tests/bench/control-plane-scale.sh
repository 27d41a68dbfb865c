#!/usr/bin/env bash
# The control plane at scale (issue 17 goal 6, issue 18 goal 6): 10 000
# endpoints in 100 services and 1000 watching sidecars (simulated: the watch
# protocol over TLS, one connection each), measured in one run against two
# meshes on loopback, one after the other:
#
#   redb  one real `control-plane` process (the default store; the baseline)
#   etcd  a real 3-member etcd cluster (Debian's `etcd`, package etcd-server)
#         and 3 `control-plane --store etcd` replicas; watcher i watches
#         replica i % 3, changes go through replica 1
#
# In each: a policy apply and a new registration are timed to their arrival
# at every watcher (p50/p99/max, the fan-out from the first watcher to the
# last); the full snapshot served to one new watcher; each control plane's
# RSS (idle and after), next to a baseline of 100 endpoints and 10 watchers
# in the same mesh. Then 1000 of the instances heartbeat at the sidecar's
# default interval (3.33 s, ttl 10s / 3; instance i through replica i % 3,
# a fresh HTTPS connection each, as a sidecar does) for a 20 s window:
# heartbeat latency, control-plane CPU, and with etcd the deltas of etcd's
# own counters on each member's client URL /metrics — Raft writes
# (etcd_server_proposals_committed_total), key puts (etcd_mvcc_put_total),
# WAL fsyncs (etcd_disk_wal_fsync_duration_seconds_count) and lease
# renewals (etcd_debugging_lease_renewed_total) — and etcd's CPU and RSS.
# Last, a table of redb and etcd side by side with etcd ÷ redb ratios.
# A full run takes about 6 minutes (the 2 × 9900 registrations dominate).
#
# Usage: tests/bench/control-plane-scale.sh [meshlet-cp-scale flags]
#        --store redb|etcd|both (default both; redb alone when `etcd` is not
#        installed), --endpoints N --services N --watchers N --rounds N
#        --heartbeaters N --heartbeat-interval-ms N --heartbeat-window S
#        --replicas N --etcd-members N; see --help.
#        A quick look (about 1 minute):
#        tests/bench/control-plane-scale.sh --endpoints 1000 --services 20 \
#            --watchers 100 --heartbeaters 100 --heartbeat-window 5
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

# The etcd half needs Debian's etcd (apt-get install etcd-server).
if ! command -v etcd >/dev/null && [[ " $* " != *" --store"* ]]; then
    echo "control-plane-scale.sh: no etcd binary; measuring redb only" >&2
    set -- --store redb "$@"
fi

MESHLET_BIN_DIR="$ROOT/target/release" RUST_LOG="${RUST_LOG:-warn}" \
    target/release/meshlet-cp-scale --out target/bench/control-plane-scale.md "$@" &
BENCH_PID=$!
wait "$BENCH_PID"
