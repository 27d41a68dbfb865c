#!/usr/bin/env bash
# meshlet sidecar: resident memory after a burst, with and without giving
# the freed memory back (`--trim-memory-above-mib`, sidecar/src/memory.rs).
# A script, not a timed test; loopback only.
#
# glibc keeps what a process frees for later: before the trim, a sidecar's
# RSS stayed at a burst's peak for good. Each run starts a sidecar in front
# of the same upstream nginx (1 worker, `200 ok`), measures its RSS idle,
# sends one burst of HTTP/2 requests (h2load, MEMORY_CLIENTS connections
# × MEMORY_STREAMS streams, MEMORY_REQUESTS requests; the app is declared
# HTTP/1.1, so every stream in flight has its own upstream connection),
# then reads its RSS peak (VmHWM) and its RSS MEMORY_SETTLE seconds after
# the burst. Two runs: the trim at its default, and off (`0`), which is
# what every build before it did. Some of the burst's requests get 502s:
# with 10 000 in flight at once the app (nginx, 4096 worker connections)
# refuses upstream connections, in both runs alike; the last column says
# how many were answered 2xx.
#
# Usage: tests/bench/memory.sh [SIDECAR]   (default target/dist/sidecar)
#   MEMORY_CLIENTS=1000 MEMORY_STREAMS=10 MEMORY_REQUESTS=50000 MEMORY_SETTLE=25
# Output: a markdown table on stdout and in target/bench/memory.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
# shellcheck source=tests/bench/lib.sh
source "$SCRIPT_DIR/lib.sh"

CLIENTS="${MEMORY_CLIENTS:-1000}"
STREAMS="${MEMORY_STREAMS:-10}"
REQUESTS="${MEMORY_REQUESTS:-50000}"
SETTLE="${MEMORY_SETTLE:-25}"
BIN="${1:-$DIST_SIDECAR}"
need_sidecar "$BIN"

install_deps h2load:nghttp2-client
make_tmp
mkdir -p "$OUT_DIR"
# Each stream in flight holds a socket in h2load's app side and two in the
# sidecar: lift the soft open-file limit as far as the hard one allows.
ulimit -n "$(ulimit -H -n)" 2>/dev/null || true

free_port UP_PORT
start_nginx upstream "$UP_PORT" '
        default_type text/plain;
        location / { return 200 "ok\n"; }'

rows=("sidecar|RSS idle MiB|peak MiB|after the burst MiB|${SETTLE} s later MiB|burst 2xx")
for trim in default 0; do
    free_port in
    free_port out
    free_port admin
    flags=(--app-protocol http1)
    [[ $trim == default ]] || flags+=(--trim-memory-above-mib "$trim")
    start_sidecar "sidecar-trim-$trim" "$BIN" "$UP_PORT" "$in" "$out" "$admin" "${flags[@]}"
    pid=$STARTED_PID
    idle_kb=$(status_kb "$pid" VmRSS)
    log "trim $trim: burst of $REQUESTS requests, $CLIENTS connections x $STREAMS streams"
    h2load -n "$REQUESTS" -c "$CLIENTS" -m "$STREAMS" "http://127.0.0.1:$in/" >"$TMP/h2load-$trim.out" 2>&1 || true
    ok=$(sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p' "$TMP/h2load-$trim.out")
    after_kb=$(status_kb "$pid" VmRSS)
    peak_kb=$(status_kb "$pid" VmHWM)
    sleep "$SETTLE"
    later_kb=$(status_kb "$pid" VmRSS)
    label="trim at the default"
    [[ $trim == default ]] || label="--trim-memory-above-mib $trim (no trim)"
    rows+=("$label|$(mib "$idle_kb")|$(mib "$peak_kb")|$(mib "$after_kb")|$(mib "$later_kb")|${ok:-0} of $REQUESTS")
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done

table=$(printf '%s\n' "${rows[@]}" | md_table)
params="h2load -n$REQUESTS -c$CLIENTS -m$STREAMS (h2c) -> sidecar inbound (--app-protocol http1) -> nginx; $(nproc) cores, $(uname -r); $BIN"
printf '\n%s\n\n%s\n' "$table" "$params"
{
    echo "# sidecar memory after a burst"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) — $params"
    echo
    echo "$table"
} >"$OUT_DIR/memory.md"
log "written to $OUT_DIR/memory.md"
