#!/usr/bin/env bash
# Push latency of the control plane: the time from a registry change until
# every watcher holds the new revision, for 200 and 1000 watchers (or the
# counts given as arguments). Each watcher is a real HTTP connection to a
# real `control-plane` process on loopback, reading the NDJSON watch stream
# exactly as a sidecar does; 5 changes per count.
#
# Usage: tests/bench/push.sh [WATCHERS...]     (default: 200 1000)
# Results: target/bench/push.md
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
COUNTS=("$@")
((${#COUNTS[@]})) || COUNTS=(200 1000)

# 1000 watchers need 1000+ descriptors in the test and in the control plane.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --bins
mkdir -p target/bench
OUT=target/bench/push.md
{
  echo "# Control plane push latency ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores)"
  echo
  echo "| watchers | p50 | p99 | max | control plane RSS |"
  echo "|---:|---:|---:|---:|---:|"
} >"$OUT"
for n in "${COUNTS[@]}"; do
  line=$(MESHLET_WATCHERS=$n cargo test --release -q -p meshlet-e2e --test control_plane \
    a_change_reaches_every_watcher_quickly -- --nocapture 2>&1 | grep '^push latency') ||
    { echo "the push latency test failed for $n watchers" >&2; exit 1; }
  echo "$line"
  # "push latency, N watchers × 5 changes: p50 X, p99 Y, max Z; control plane RSS R MiB"
  sed -E 's/^push latency, ([0-9]+) watchers.*: p50 ([^,]+), p99 ([^,]+), max ([^;]+); control plane RSS (.+)$/| \1 | \2 | \3 | \4 | \5 |/' <<<"$line" >>"$OUT"
done
echo
cat "$OUT"
