#!/usr/bin/env bash
# meshlet sidecar: a burst beyond the app's accept queue, against the app
# alone and nginx in front of it (a script, not a timed test; loopback only).
#
# The app is Python's threading HTTP server with the standard library's
# listen backlog of 5 (tests/bench/backlog_app.py, 20 ms per request,
# keep-alive). A burst of ACCEPT_CLIENTS new connections at once overflows
# that queue: the kernel drops the SYNs it has no room for and sends them
# again only after 1 s (then 3 s, 7 s ...). Each path gets a fresh app and a
# fresh proxy, then one cold burst (h2load --h1, ACCEPT_CLIENTS connections,
# ACCEPT_REQUESTS requests):
#
#   direct        h2load -> app
#   sidecar       h2load -> sidecar inbound (defaults) -> app
#   baseline      the same with ACCEPT_BASELINE (another sidecar build), if set
#   nginx         h2load -> nginx (1 worker, upstream keepalive 64, default
#                 proxy_connect_timeout 60 s) -> app
#
# Usage: tests/bench/accept_queue.sh [SIDECAR]   (default target/dist/sidecar)
#   ACCEPT_CLIENTS=200 ACCEPT_REQUESTS=2000 ACCEPT_BACKLOG=5 ACCEPT_SLEEP_MS=20
#   ACCEPT_BASELINE=/path/to/older/sidecar
#   ACCEPT_CLOSE=1   the app answers every request with `Connection: close`
#                    (every request needs a new connection)
# Output: a markdown table on stdout and in target/bench/accept_queue.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
# shellcheck source=tests/bench/lib.sh
source "$SCRIPT_DIR/lib.sh"

CLIENTS="${ACCEPT_CLIENTS:-200}"
REQUESTS="${ACCEPT_REQUESTS:-2000}"
BACKLOG="${ACCEPT_BACKLOG:-5}"
SLEEP_MS="${ACCEPT_SLEEP_MS:-20}"
BIN="${1:-$DIST_SIDECAR}"
BASELINE="${ACCEPT_BASELINE:-}"
CLOSE=""
[[ "${ACCEPT_CLOSE:-0}" != 1 ]] || CLOSE=1
need_sidecar "$BIN"
[[ -z "$BASELINE" || -x "$BASELINE" ]] || die "$BASELINE is not an executable"

install_deps h2load:nghttp2-client python3:python3
make_tmp
mkdir -p "$OUT_DIR"

# start_app: a fresh app on APP_PORT (its pid in APP_PID).
start_app() {
    free_port APP_PORT
    python3 "$SCRIPT_DIR/backlog_app.py" "$APP_PORT" "$SLEEP_MS" "$BACKLOG" ${CLOSE:+close} &
    APP_PID=$!
    PIDS+=("$APP_PID")
    wait_http "http://127.0.0.1:$APP_PORT/" "$APP_PID" "app"
}

# burst NAME PORT: the cold burst at PORT; one table row.
burst() {
    local name=$1 port=$2 log="$TMP/h2load-$1.log" started ended
    log "$name: $REQUESTS requests on $CLIENTS new connections"
    started=$(date +%s.%N)
    timeout 300 h2load --h1 -c "$CLIENTS" -n "$REQUESTS" -T 60 --log-file="$log" \
        "http://127.0.0.1:$port/" >"$TMP/h2load-$name.out" 2>&1 || true
    ended=$(date +%s.%N)
    python3 - "$log" "$REQUESTS" "$name" "$started" "$ended" <<'PY'
import collections, sys
path, total, name, started, ended = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
rows = [line.split() for line in open(path) if line.strip()]
statuses = collections.Counter(row[1] for row in rows)
ms = sorted(int(row[2]) / 1000 for row in rows)
at = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))] if ms else 0
ok = sum(n for s, n in statuses.items() if s.startswith("2"))
errors = ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items()) if not s.startswith("2"))
unanswered = total - len(rows)
if unanswered:
    errors = (errors + ", " if errors else "") + f"{unanswered} unanswered"
print(f"{name}|{ok} of {total}|{errors or 'none'}|{at(0.5):.0f}|{at(0.99):.0f}|{(ms or [0])[-1]:.0f}|{ended - started:.1f}")
PY
}

rows=("path|2xx|errors|p50 ms|p99 ms|max ms|burst s")

start_app
rows+=("$(burst direct "$APP_PORT")")
kill "$APP_PID" 2>/dev/null || true

for which in sidecar baseline; do
    bin=$BIN
    if [[ $which == baseline ]]; then
        [[ -n "$BASELINE" ]] || continue
        bin=$BASELINE
    fi
    start_app
    free_port in
    free_port out
    free_port admin
    start_sidecar "$which" "$bin" "$APP_PORT" "$in" "$out" "$admin"
    rows+=("$(burst "$which" "$in")")
    kill "$STARTED_PID" "$APP_PID" 2>/dev/null || true
done

start_app
free_port NGINX_PORT
start_nginx_proxy nginx "$NGINX_PORT" "$APP_PORT"
rows+=("$(burst nginx "$NGINX_PORT")")

table=$(printf '%s\n' "${rows[@]}" | md_table)
params="h2load --h1 -c$CLIENTS -n$REQUESTS, cold; app: Python ThreadingHTTPServer, backlog $BACKLOG, ${SLEEP_MS} ms per request${CLOSE:+, Connection: close}; $(nproc) cores, $(uname -r); $BIN${BASELINE:+, baseline $BASELINE}"
printf '\n%s\n\n%s\n' "$table" "$params"
{
    echo "# a burst beyond the app's accept queue"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) — $params"
    echo
    echo "$table"
} >"$OUT_DIR/accept_queue.md"
log "written to $OUT_DIR/accept_queue.md"
