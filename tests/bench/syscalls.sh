#!/usr/bin/env bash
# meshlet sidecar vs nginx: system calls per proxied request (a profiling
# script, not a timed test).
#
# Wall-clock throughput is noisy on a shared machine; the number of system
# calls a proxy makes per request is not (much): it depends on how the proxy
# batches its socket work, not on how fast the CPU happens to be. This script
# counts them with the kernel's syscall tracepoints (`perf stat -e
# syscalls:sys_enter_*`, attached to the proxy's process: every thread of the
# sidecar, the worker of the nginx peer), which slows nothing down unlike
# strace.
#
# Targets, all in front of the same upstream nginx (1 worker, `200 ok\n`):
#
#   nginx     nginx reverse proxy, 1 worker, upstream keep-alive (run.sh's peer)
#   inbound   sidecar inbound -> app, standalone, metrics and tracing on
#   policies  sidecar inbound -> app with a rate limit (large bucket), tracing
#             sampled at 1.0 and spans exported over OTLP/HTTP to the upstream
#   outbound  sidecar outbound (Host: app) -> app under a circuit breaker, a
#             retry and a timeout policy
#
# Each target: warm-up (SYSCALLS_WARMUP requests), then exactly
# SYSCALLS_REQUESTS keep-alive HTTP/1.1 requests from h2load (SYSCALLS_CONNS
# connections, one request in flight on each) while perf counts.
#
# Usage: tests/bench/syscalls.sh [SIDECAR...]   (default target/dist/sidecar)
#   SYSCALLS_REQUESTS=20000  SYSCALLS_WARMUP=2000  SYSCALLS_CONNS=32
#   SYSCALLS_TARGETS="nginx inbound policies outbound"
# Output: a markdown table (calls per request by kind) on stdout and in
# target/bench/syscalls.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
# shellcheck source=tests/bench/lib.sh
source "$SCRIPT_DIR/lib.sh"

REQUESTS="${SYSCALLS_REQUESTS:-20000}"
WARM="${SYSCALLS_WARMUP:-2000}"
SCONNS="${SYSCALLS_CONNS:-32}"
TARGETS="${SYSCALLS_TARGETS:-nginx inbound policies outbound}"
KINDS=(read write readv writev recvfrom sendto recvmsg sendmsg epoll_wait epoll_pwait
    epoll_ctl futex setsockopt getsockopt brk accept4 connect close)

BINS=("$@")
[[ ${#BINS[@]} -gt 0 ]] || BINS=("$DIST_SIDECAR")
for b in "${BINS[@]}"; do need_sidecar "$b"; done

install_deps h2load:nghttp2-client perf:linux-perf
make_tmp
mkdir -p "$OUT_DIR"

start_profile_upstream

# load PORT N [HOST]: N keep-alive requests, every one answered 2xx.
load() {
    local port=$1 n=$2 host=()
    [[ -z "${3:-}" ]] || host=(-H ":authority: $3")
    h2load --h1 -n "$n" -c "$SCONNS" -m 1 "${host[@]}" "http://127.0.0.1:$port/" >"$TMP/h2load.out" 2>&1 ||
        { cat "$TMP/h2load.out" >&2; die "h2load failed"; }
    grep -q "status codes: $n 2xx" "$TMP/h2load.out" ||
        { cat "$TMP/h2load.out" >&2; die "h2load: not every status was 2xx"; }
}

# count PID PORT [HOST]: sets COUNT[kind] (per request) over REQUESTS requests.
declare -A COUNT
count() {
    local pid=$1 port=$2 authority=${3:-} events=() k
    for k in "${KINDS[@]}"; do events+=(-e "syscalls:sys_enter_$k"); done
    events+=(-e raw_syscalls:sys_enter)
    load "$port" "$WARM" "$authority"
    perf stat -x, "${events[@]}" -p "$pid" -o "$TMP/perf.out" &
    local perf_pid=$!
    sleep 0.5
    load "$port" "$REQUESTS" "$authority"
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    COUNT=()
    for k in "${KINDS[@]}" total; do
        local ev="syscalls:sys_enter_$k"
        [[ $k == total ]] && ev=raw_syscalls:sys_enter
        COUNT[$k]=$(awk -F, -v e="$ev" -v n="$REQUESTS" '$3 == e { printf "%.2f", $1 / n }' "$TMP/perf.out")
    done
}

header="target"
for k in "${KINDS[@]}" total; do header+="|$k"; done
rows=("$header")
row() {
    local r=$1 k
    for k in "${KINDS[@]}" total; do r+="|${COUNT[$k]:--}"; done
    rows+=("$r")
}

for target in $TARGETS; do
    case "$target" in
        nginx)
            free_port PEER_PORT
            start_nginx_proxy peer "$PEER_PORT" "$UP_PORT"
            worker=$(pgrep -P "$PEER_PID" | head -n1)
            log "nginx (worker $worker)"
            count "$worker" "$PEER_PORT"
            row "nginx (1 worker, keepalive)"
            ;;
        inbound | policies | outbound)
            n=0
            for bin in "${BINS[@]}"; do
                n=$((n + 1))
                free_port in
                free_port out
                free_port admin
                scenario_flags "$target"
                start_sidecar "sidecar-$target-$n" "$bin" "$UP_PORT" "$in" "$out" "$admin" "${SCENARIO_FLAGS[@]}"
                log "$target: $bin (pid $STARTED_PID)"
                if [[ $target == outbound ]]; then
                    count "$STARTED_PID" "$out" app
                else
                    count "$STARTED_PID" "$in"
                fi
                row "$target ($bin)"
                kill -TERM "$STARTED_PID" 2>/dev/null || true
                wait "$STARTED_PID" 2>/dev/null || true
            done
            ;;
        *) die "unknown target $target" ;;
    esac
done

table=$(printf '%s\n' "${rows[@]}" | md_table)
params="system calls per request over $REQUESTS requests after $WARM of warm-up; h2load --h1 -c$SCONNS -m1; $(nproc) cores, $(uname -r); load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '\n%s\n\n%s\n' "$table" "$params"
{
    echo "# system calls per proxied request"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) — $params"
    echo
    echo "$table"
} >"$OUT_DIR/syscalls.md"
log "written to $OUT_DIR/syscalls.md"
