#!/usr/bin/env bash
# meshlet sidecar benchmark (a script, not a timed test).
#
# What it measures, in one run, on loopback only (127.0.0.1):
#
#   direct   wrk -> upstream                      (baseline: the app alone)
#   sidecar  wrk -> sidecar inbound -> upstream   (target/dist/sidecar)
#   nginx    wrk -> nginx proxy     -> upstream   (peer: 1 worker, keep-alive
#                                                  upstream pool of 64)
#
# The upstream ("the app") is its own nginx instance, 1 worker, answering
# `200 ok\n` from memory with access_log off. All three targets hit that same
# upstream, one after another, in the same run.
#
# For each target:
#   1. a short warm-up (connections and pools are opened, caches warm);
#   2. throughput: wrk closed loop, BENCH_THREADS threads x BENCH_CONNS
#      connections for BENCH_DURATION -> req/s;
#   3. latency: a fixed request rate (BENCH_RATE req/s, open loop) over
#      BENCH_LAT_CONNS connections for BENCH_DURATION -> p50 / p99.
# The sidecar's peak RSS is VmHWM (the kernel's high-water mark), read after
# the runs (no RSS sampler: its wake-ups stretched the p99s, see all.sh).
#
# Fixed-rate tool: Debian has no wrk2 package (`apt-cache policy wrk2` finds
# nothing), so the latency run uses plain wrk with a Lua script (written to
# the temp dir below). Its delay() hook paces requests: every call claims the
# next slot of a global schedule (one slot every 1/BENCH_RATE s, clock from
# clock_gettime through LuaJIT's FFI) and waits until that slot, so the total
# rate is BENCH_RATE whatever the connection count, with requests spread out
# instead of sent in bursts. wrk times each request from the moment it is
# written to its last response byte, and the done() hook prints the latency
# percentiles (wrk records them in microseconds). With a moderate rate and
# enough connections no request waits for a free connection, so the
# coordinated-omission error that wrk2 corrects for stays out of the numbers.
#
# How to read the table:
#   req/s            throughput from the closed-loop run (higher is better).
#   ratio to direct  req/s / direct's req/s: the share of the bare upstream's
#                    throughput left once the proxy is in the path (~1 would be
#                    free; on 2 cores the proxy competes with wrk and the
#                    upstream for CPU, so expect well below 1).
#   ratio to nginx   req/s / the nginx peer's req/s: >= 1 means the proxy is at
#                    least as fast as nginx doing the same job.
#   p50 / p99 ms     latency percentiles at the fixed rate.
#   added ... vs direct  p50/p99 minus direct's: what the proxy hop costs.
#                    Compare the sidecar's against nginx's.
#   errors           socket errors + responses with status >= 400 over the
#                    target's runs (wrk counts failed responses in req/s too,
#                    so a non-zero value makes that row meaningless).
# Under the table: the sidecar's RSS; the CPU that other processes used during
# the runs (over BENCH_OTHER_CPU_LIMIT % of a core the numbers are skewed:
# rerun on a quiet machine); and whether the sidecar meets its targets
# (req/s >= nginx's, added p50 and p99 <= nginx's, RSS <= 20 MiB).
# Even on a quiet machine, runs differ by 10-20% in req/s and more in p99
# (nothing is pinned, and which process shares a core with which varies), so
# treat smaller differences as noise and use BENCH_ROUNDS=3 to settle them.
#
# Usage: tests/bench/run.sh
#   BENCH_DURATION=10s  duration of each throughput and latency run
#   BENCH_RATE=1000     fixed rate of the latency runs, req/s
#   BENCH_THREADS=1 BENCH_CONNS=32   wrk threads / connections, throughput
#   BENCH_LAT_CONNS=16  connections of the latency runs
#   BENCH_WARMUP=2s     warm-up per target
#   BENCH_SIDECAR=PATH  the sidecar binary to measure (default target/dist/sidecar),
#                       e.g. an older build, to compare two versions against nginx
#   BENCH_ROUNDS=1      repeat the three targets this many times, interleaved
#                       (direct, sidecar, nginx, direct, ...); the table shows
#                       each target's median over the rounds
#   BENCH_OTHER_CPU_LIMIT=10  warn when other processes use more than this %
#                       of a core during a run (see cpu_mark below)
#   BENCH_KEEP=1        keep the temp dir (configs, logs) after the run
# Output: the table on stdout and in target/bench/one-hop.md (all.sh writes
# results.md).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

ROUNDS="${BENCH_ROUNDS:-1}"
SIDECAR="${BENCH_SIDECAR:-$ROOT/target/dist/sidecar}"
# The helpers shared with observability.sh (wrk runs, nginx, RSS and CPU
# sampling, the table) and the other BENCH_* settings; installs the cleanup
# trap that stops every process started here.
# shellcheck source=tests/bench/lib.sh
source "$SCRIPT_DIR/lib.sh"
RESULTS="$OUT_DIR/one-hop.md"

# shellcheck disable=SC2119 # no extra packages
install_deps
build_bins
[[ -x "$SIDECAR" ]] || die "$SIDECAR was not built"
make_tmp

TARGETS=(direct sidecar nginx)
declare -A LABEL=(
    [direct]="direct (upstream)"
    [sidecar]="sidecar (inbound->app)"
    [nginx]="nginx peer (1 worker)"
)

# --------------------------------------------------------------- services --
free_port UP_PORT
free_port PEER_PORT
free_port IN_PORT
free_port OUT_PORT
free_port ADMIN_PORT

log "upstream nginx on 127.0.0.1:$UP_PORT"
start_nginx upstream "$UP_PORT" '
        default_type text/plain;
        location / { return 200 "ok\n"; }'

log "peer nginx proxy on 127.0.0.1:$PEER_PORT"
start_nginx_proxy peer "$PEER_PORT" "$UP_PORT"

log "sidecar: inbound 127.0.0.1:$IN_PORT -> app $UP_PORT, admin $ADMIN_PORT"
start_sidecar sidecar "$SIDECAR" "$UP_PORT" "$IN_PORT" "$OUT_PORT" "$ADMIN_PORT"
SIDECAR_PID=$STARTED_PID
SIDECAR_RSS_IDLE=$(status_kb "$SIDECAR_PID" VmRSS)
collect_our_pids

# -------------------------------------------------------------- the runs --
# Only informative: the load average still counts the build above and earlier
# runs; each run measures the other processes' CPU itself (cpu_mark).
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)

declare -A PORT=([direct]=$UP_PORT [sidecar]=$IN_PORT [nginx]=$PEER_PORT)
for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${TARGETS[@]}"; do
        bench "$t" "${PORT[$t]}" "$round"
    done
done

kill -0 "$SIDECAR_PID" 2>/dev/null || die "sidecar exited during the benchmark"
SIDECAR_RSS_AFTER=$(status_kb "$SIDECAR_PID" VmRSS)
SIDECAR_HWM=$(status_kb "$SIDECAR_PID" VmHWM)
PEER_WORKER=$(ps --ppid "$PEER_PID" -o pid= | head -n1 | tr -d ' ')
PEER_HWM=$([[ -n "$PEER_WORKER" ]] && status_kb "$PEER_WORKER" VmHWM || echo 0)
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

# Per target: the median over the rounds (errors: the sum).
summarize "${TARGETS[@]}"

# ----------------------------------------------------------------- report --
rows=()
rows+=("target|req/s|ratio to direct|ratio to nginx|p50 ms|p99 ms|added p50 vs direct|added p99 vs direct|errors")
for t in "${TARGETS[@]}"; do
    rows+=("${LABEL[$t]}|${RPS[$t]}|$(ratio "${RPS[$t]}" "${RPS[direct]}")|$(ratio "${RPS[$t]}" "${RPS[nginx]}")|$(ms "${P50[$t]}")|$(ms "${P99[$t]}")|$(added "${P50[$t]}" "${P50[direct]}")|$(added "${P99[$t]}" "${P99[direct]}")|${ERRS[$t]}")
done
table=$(printf '%s\n' "${rows[@]}" | md_table)

rss_line="sidecar RSS: peak (VmHWM) $(mib "$SIDECAR_HWM") MiB (idle before load $(mib "$SIDECAR_RSS_IDLE") MiB, after load $(mib "$SIDECAR_RSS_AFTER") MiB); nginx peer worker VmHWM $(mib "$PEER_HWM") MiB"

c_tput=$(awk -v s="${RPS[sidecar]}" -v n="${RPS[nginx]}" 'BEGIN { print (s >= n) }')
c_p50=$(awk -v s="${P50[sidecar]}" -v n="${P50[nginx]}" 'BEGIN { print (s <= n) }')
c_p99=$(awk -v s="${P99[sidecar]}" -v n="${P99[nginx]}" 'BEGIN { print (s <= n) }')
c_rss=$(awk -v h="$SIDECAR_HWM" 'BEGIN { print (h <= 20 * 1024) }')
other_line=$(other_cpu_line "${TARGETS[@]}")
targets="targets: sidecar req/s >= nginx: $(check "$c_tput"); added p50 <= nginx's: $(check "$c_p50"); added p99 <= nginx's: $(check "$c_p99"); RSS <= 20 MiB: $(check "$c_rss")"

params="loopback, $(nproc) cores, $(uname -r); throughput: wrk -t$THREADS -c$CONNS -d$DURATION; latency: $RATE req/s fixed rate, -t1 -c$LAT_CONNS -d$DURATION; warm-up $WARMUP per target; $ROUNDS round(s), median shown; load average $LOAD_BEFORE before, $LOAD_AFTER after; $(tool_versions)"

printf '\n%s\n\n%s\n%s\n%s\n%s\n' "$table" "$rss_line" "$other_line" "$targets" "$params"

mkdir -p "$OUT_DIR"
{
    echo "# meshlet sidecar benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) — $params"
    echo
    echo "$table"
    echo
    echo "$rss_line"
    echo
    echo "$other_line"
    echo
    echo "$targets"
} >"$RESULTS"
log "written to $RESULTS"
