#!/usr/bin/env bash
# meshlet sidecar cost per request (a profiling script, not a timed test).
#
# Where run.sh measures throughput and latency (wall clock, noisy on a shared
# machine), this script counts what one proxied request costs the sidecar, in
# units that other processes barely disturb:
#
#   Ir/req       instructions executed by the sidecar per request, counted by
#                valgrind's callgrind (user space only; repeatable to ~1 %
#                whatever else runs on the machine);
#   user/sys us  CPU time of the sidecar per request without valgrind, from
#                /proc/PID/stat (utime, stime) before and after the requests
#                (the system part is the kernel's socket work; both grow
#                somewhat when the machine is busy);
#   syscalls/req system calls per request (strace -c -f on the native run;
#                only with PROFILE_STRACE=1, it slows the run down).
#
# Each sidecar binary given (default target/dist/sidecar) is measured in
# each scenario, one after the other, against the same upstream nginx (1
# worker, `200 ok\n` from memory):
#
#   inbound   h2load -> sidecar inbound -> app            (run.sh's placement:
#             standalone, metrics and tracing on, no policies)
#   policies  h2load -> sidecar inbound -> app, with a --config holding a
#             RateLimitPolicy of the own service (large bucket, applies to
#             every request), a TracingPolicy (sampling 1.0) and spans exported
#             over OTLP/HTTP to the upstream's /v1/traces sink
#   outbound  h2load -> sidecar outbound (Host: app) -> app, the service `app`
#             under a CircuitBreakerPolicy, a RetryPolicy and a TimeoutPolicy
#   post      h2load -> sidecar inbound -> app as inbound, each request a
#             POST with a 256-byte body (sent with its head)
#   row-policies  h2load -> sidecar inbound -> app with exactly all.sh's
#             "sidecar + policies" row (issue 17's goal 1): rate limit,
#             breaker, retry and timeout for the own service, default
#             tracing, no span export (not in the default list)
#
# Each measurement: the sidecar is started (under callgrind with collection
# off, or natively), warmed up with PROFILE_WARMUP requests, then collection
# is switched on (callgrind_control -i on / the CPU times read) for exactly
# PROFILE_REQUESTS keep-alive requests from h2load (HTTP/1.1, PROFILE_CONNS
# connections, one request in flight on each), then read. Start-up and
# warm-up are outside the counts.
#
# Usage: tests/bench/profile.sh [SIDECAR...]
#   PROFILE_REQUESTS=20000  requests counted per measurement
#   PROFILE_WARMUP=2000     requests before counting
#   PROFILE_CONNS=8         h2load connections
#   PROFILE_SCENARIOS="inbound policies outbound"
#   PROFILE_CALLGRIND=1     0 skips the callgrind runs (CPU times only)
#   PROFILE_ANNOTATE=0      1 keeps callgrind_annotate's top functions in
#                           target/bench/profile-<scenario>-<n>.txt and the
#                           dump in target/bench/callgrind-<scenario>-<n>.out
#                           (for callgrind_annotate --tree=caller, kcachegrind)
#   PROFILE_STRACE=0        1 adds a syscall count per request (strace)
# Output: a markdown table on stdout and in target/bench/profile.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
# shellcheck source=tests/bench/lib.sh
source "$SCRIPT_DIR/lib.sh"

REQUESTS="${PROFILE_REQUESTS:-20000}"
WARM="${PROFILE_WARMUP:-2000}"
PCONNS="${PROFILE_CONNS:-8}"
SCENARIOS="${PROFILE_SCENARIOS:-inbound policies outbound}"
CALLGRIND="${PROFILE_CALLGRIND:-1}"
ANNOTATE="${PROFILE_ANNOTATE:-0}"
STRACE="${PROFILE_STRACE:-0}"

BINS=("$@")
[[ ${#BINS[@]} -gt 0 ]] || BINS=("$DIST_SIDECAR")
for b in "${BINS[@]}"; do need_sidecar "$b"; done

deps=(h2load:nghttp2-client)
[[ "$CALLGRIND" == 1 ]] && deps+=(valgrind:valgrind)
[[ "$STRACE" == 1 ]] && deps+=(strace:strace)
install_deps "${deps[@]}"
make_tmp
mkdir -p "$OUT_DIR"

start_profile_upstream

# sidecar_args SCENARIO IN OUT ADMIN: the sidecar's flags for a scenario.
sidecar_args() {
    local scenario=$1 in=$2 out=$3 admin=$4
    scenario_flags "$scenario"
    ARGS=(--service bench --app-port "$UP_PORT" --inbound-ip 127.0.0.1
        --inbound-port "$in" --outbound-port "$out" --admin-port "$admin" "${SCENARIO_FLAGS[@]}")
}

# load SCENARIO IN OUT N: N keep-alive requests through the scenario's listener.
load() {
    local scenario=$1 in=$2 out=$3 n=$4 port=$2 host=() data=()
    if [[ "$scenario" == outbound ]]; then
        port=$out
        host=(-H ":authority: app")
    fi
    if [[ "$scenario" == post ]]; then
        [[ -f "$TMP/post-body" ]] || head -c 256 /dev/zero | tr '\0' x >"$TMP/post-body"
        data=(-d "$TMP/post-body")
    fi
    h2load --h1 -n "$n" -c "$PCONNS" -m 1 "${host[@]}" "${data[@]}" "http://127.0.0.1:$port/" >"$TMP/h2load.out" 2>&1 ||
        { cat "$TMP/h2load.out" >&2; die "h2load failed"; }
    grep -q "succeeded, 0 failed, 0 errored" "$TMP/h2load.out" ||
        grep -q "$n succeeded" "$TMP/h2load.out" ||
        { cat "$TMP/h2load.out" >&2; die "h2load: not every request succeeded"; }
    grep -q "status codes: $n 2xx" "$TMP/h2load.out" ||
        { cat "$TMP/h2load.out" >&2; die "h2load: not every status was 2xx"; }
}

# stop PID: TERM, wait (a sidecar under valgrind takes a moment).
stop() {
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# cpu_ticks PID: utime + stime in clock ticks ("U S").
cpu_ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

# native BIN SCENARIO: sets CPU_USER_US, CPU_SYS_US (per request), SYSCALLS.
native() {
    local bin=$1 scenario=$2 in out admin
    free_port in
    free_port out
    free_port admin
    sidecar_args "$scenario" "$in" "$out" "$admin"
    "$bin" "${ARGS[@]}" >"$TMP/native.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$admin/ready" "$pid" "sidecar"
    load "$scenario" "$in" "$out" "$WARM"
    local hz before after
    hz=$(getconf CLK_TCK)
    read -r -a before < <(cpu_ticks "$pid")
    load "$scenario" "$in" "$out" "$REQUESTS"
    read -r -a after < <(cpu_ticks "$pid")
    CPU_USER_US=$(awk -v a="${after[0]}" -v b="${before[0]}" -v hz="$hz" -v n="$REQUESTS" 'BEGIN { printf "%.1f", (a - b) * 1e6 / hz / n }')
    CPU_SYS_US=$(awk -v a="${after[1]}" -v b="${before[1]}" -v hz="$hz" -v n="$REQUESTS" 'BEGIN { printf "%.1f", (a - b) * 1e6 / hz / n }')
    SYSCALLS="-"
    if [[ "$STRACE" == 1 ]]; then
        strace -c -f -p "$pid" -o "$TMP/strace.out" &
        local strace_pid=$!
        sleep 1
        load "$scenario" "$in" "$out" "$REQUESTS"
        kill -INT "$strace_pid" 2>/dev/null || true
        wait "$strace_pid" 2>/dev/null || true
        SYSCALLS=$(awk -v n="$REQUESTS" '/total$/ { printf "%.2f", $(NF-2) / n }' "$TMP/strace.out")
    fi
    stop "$pid"
}

# counted BIN SCENARIO TAG: sets IR_PER_REQ (callgrind).
counted() {
    local bin=$1 scenario=$2 tag=$3 in out admin
    free_port in
    free_port out
    free_port admin
    sidecar_args "$scenario" "$in" "$out" "$admin"
    local cg="$TMP/callgrind.out"
    rm -f "$cg"*
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$cg" \
        "$bin" "${ARGS[@]}" >"$TMP/callgrind.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$admin/ready" "$pid" "sidecar (callgrind)"
    load "$scenario" "$in" "$out" "$WARM"
    callgrind_control -i on "$pid" >/dev/null
    load "$scenario" "$in" "$out" "$REQUESTS"
    callgrind_control -i off "$pid" >/dev/null
    callgrind_control -d "$pid" >/dev/null
    local dump
    for _ in $(seq 100); do
        dump=$(find "$(dirname "$cg")" -maxdepth 1 -name "$(basename "$cg").*" | head -n1)
        [[ -n "$dump" ]] && grep -q '^totals:' "$dump" 2>/dev/null && break
        sleep 0.1
    done
    [[ -n "$dump" ]] || die "callgrind wrote no dump"
    local total
    total=$(awk '/^totals:/ { print $2 }' "$dump")
    IR_PER_REQ=$(awk -v t="$total" -v n="$REQUESTS" 'BEGIN { printf "%.0f", t / n }')
    if [[ "$ANNOTATE" == 1 ]]; then
        callgrind_annotate --inclusive=no "$dump" 2>/dev/null | head -n 80 \
            >"$OUT_DIR/profile-$scenario-$tag.txt" || true
        callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | head -n 120 \
            >"$OUT_DIR/profile-$scenario-$tag-inclusive.txt" || true
        cp "$dump" "$OUT_DIR/callgrind-$scenario-$tag.out"
    fi
    stop "$pid"
    rm -f "$cg"*
}

rows=("binary|scenario|Ir/req|user us/req|sys us/req|syscalls/req")
for scenario in $SCENARIOS; do
    n=0
    for bin in "${BINS[@]}"; do
        n=$((n + 1))
        log "$scenario: $bin"
        IR_PER_REQ="-"
        [[ "$CALLGRIND" == 1 ]] && counted "$bin" "$scenario" "$n"
        native "$bin" "$scenario"
        rows+=("$bin|$scenario|$IR_PER_REQ|$CPU_USER_US|$CPU_SYS_US|$SYSCALLS")
    done
done

table=$(printf '%s\n' "${rows[@]}" | md_table)
params="$REQUESTS requests counted after $WARM of warm-up; h2load --h1 -c$PCONNS -m1; $(nproc) cores, $(uname -r); load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '\n%s\n\n%s\n' "$table" "$params"
{
    echo "# meshlet sidecar cost per request"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) — $params"
    echo
    echo "$table"
} >"$OUT_DIR/profile.md"
log "written to $OUT_DIR/profile.md"
