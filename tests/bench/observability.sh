#!/usr/bin/env bash
# meshlet tracing-overhead benchmark (a script, not a timed test).
#
# What it measures, in one run, on loopback only (127.0.0.1): what the
# sidecar's tracing costs, as ratios between sidecars that differ only in it.
#
#   off       wrk -> sidecar --tracing off                       -> upstream
#   on        wrk -> sidecar --tracing on, spans to the sink     -> upstream
#   hung      wrk -> sidecar --tracing on, spans to a collector  -> upstream
#                    that accepts connections and never answers
#   baseline  wrk -> another sidecar binary (BENCH_BASELINE),    -> upstream
#                    no tracing flags: e.g. a build from before the
#                    observability work (optional)
#
# Each target is its own target/dist/sidecar process (standalone: service
# `bench`, no config, no control plane), driven through its inbound listener.
# No TracingPolicy exists, so `on` samples every request (ratio 1.0): each
# proxied request is a span, batch-exported over OTLP/HTTP.
#
# The upstream ("the app") is an nginx, 1 worker, answering `200 ok\n` on `/`
# from memory. The same nginx is the `on` sidecar's collector: `location =
# /v1/traces` answers 200 and discards the body, so span export meets a live
# collector that costs next to nothing. The `hung` collector is a small python
# listener that accepts connections and never reads or answers: every export
# waits for its timeout and the batch is dropped, the queue fills and further
# spans are dropped on submit (both counted in meshlet_spans_dropped_total).
# That run shows whether a dead collector reaches the request path.
#
# The targets run one after another, in interleaved rounds (off, on, hung,
# [baseline], off, on, ...), so slow drifts of the machine hit all of them
# alike. Each run is the one of run.sh (shared helpers in lib.sh):
#   1. a short warm-up;
#   2. throughput: wrk closed loop, BENCH_THREADS threads x BENCH_CONNS
#      connections for BENCH_DURATION -> req/s;
#   3. latency: a fixed request rate (BENCH_RATE req/s, open loop, paced by a
#      wrk Lua script as in run.sh) over BENCH_LAT_CONNS connections for
#      BENCH_DURATION -> p50 / p99.
# After each run of a sidecar its /metrics is scraped for
# meshlet_spans_exported_total and meshlet_spans_dropped_total (summed over
# labels; `n/a` when the sidecar has no such metric). Every sidecar's peak RSS
# is its VmHWM, read after the runs (no RSS sampler: its wake-ups stretched
# the p99s, see all.sh).
#
# How to read the output:
#   req/s          median over the rounds of the closed-loop runs.
#   ratio to off   req/s / off's req/s. `on`'s is the tracing overhead; the
#                  acceptance line is `on/off >= 0.90` (within 10 %). Per-round
#                  ratios are printed too: off and on of one round ran back to
#                  back, so their spread shows the noise.
#   p50 / p99 ms   medians of the latency percentiles at the fixed rate;
#                  `vs off` is the difference to off's. `hung` should match
#                  off (the request path never waits for the collector).
#   errors         socket errors + responses with status >= 400 over the
#                  target's runs (a non-zero value makes its row meaningless).
#   RSS MiB        peak: VmHWM of that sidecar process;
#                  (idle): its VmRSS once ready, before any load.
#   requests sent  all requests the target got (warm-ups included).
#   spans exported / dropped   the counters after the last round plus 1s (one
#                  export flush); `on` should have exported about one span per
#                  request sent and dropped none; `hung` exported none and
#                  dropped most (batches still waiting for their 5s export
#                  timeout are not counted yet). 0 or n/a for `on` means the
#                  build exports no spans: then on/off measures nothing.
# Under the table: the per-run span counters, the tracing overhead line, the
# hung collector's latency against off, [the baseline's ratios], the other
# processes' CPU during the runs (over BENCH_OTHER_CPU_LIMIT % of a core the
# numbers are skewed: rerun on a quiet machine) and the parameters. As in
# run.sh, runs differ by 10-20% in req/s on this 2-core machine even when it is
# quiet; hence the rounds and the medians.
#
# Usage: tests/bench/observability.sh
#   BENCH_ROUNDS=3      rounds of the interleaved targets; medians shown
#   BENCH_BASELINE=PATH another sidecar binary, run as a fourth target without
#                       tracing flags (it may predate them)
#   BENCH_SIDECAR=PATH  the sidecar binary for off/on/hung (default
#                       target/dist/sidecar, built by this script)
#   BENCH_DURATION=10s BENCH_RATE=1000 BENCH_THREADS=1 BENCH_CONNS=32
#   BENCH_LAT_CONNS=16 BENCH_WARMUP=2s BENCH_OTHER_CPU_LIMIT=10 BENCH_KEEP=1
#                       as in run.sh
# Output: the table on stdout and in target/bench/observability.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

ROUNDS="${BENCH_ROUNDS:-3}"
SIDECAR="${BENCH_SIDECAR:-$ROOT/target/dist/sidecar}"
BASELINE="${BENCH_BASELINE:-}"
# The helpers shared with run.sh and the other BENCH_* settings; installs the
# cleanup trap that stops every process started here.
# shellcheck source=tests/bench/lib.sh
source "$SCRIPT_DIR/lib.sh"
RESULTS="$OUT_DIR/observability.md"

# The sidecars take settings from MESHLET_* variables too; only the flags
# below may differ between the targets.
while read -r var; do unset "$var"; done < <(compgen -e MESHLET_ || true)

install_deps python3:python3
build_bins
[[ -x "$SIDECAR" ]] || die "$SIDECAR was not built"
"$SIDECAR" --help 2>/dev/null | grep -q -- '--trace-endpoint' ||
    die "$SIDECAR has no --tracing/--trace-endpoint flags"
if [[ -n "$BASELINE" ]]; then
    [[ -x "$BASELINE" ]] || die "BENCH_BASELINE=$BASELINE is not an executable"
    BASELINE="$(cd "$(dirname "$BASELINE")" && pwd)/$(basename "$BASELINE")"
fi
# The interpreter itself, not a version manager's shim, so that its PID is the
# listener's.
PYTHON=$(python3 -c 'import sys; print(sys.executable)')
make_tmp

TARGETS=(off on hung)
[[ -z "$BASELINE" ]] || TARGETS+=(baseline)
declare -A LABEL=(
    [off]="off (--tracing off)"
    [on]="on (spans to the sink)"
    [hung]="hung (collector never answers)"
    [baseline]="baseline (BENCH_BASELINE)"
)

# --------------------------------------------------------------- services --
free_port UP_PORT
free_port HUNG_PORT
declare -A IN_PORT OUT_PORT ADMIN_PORT SC_PID RSS_IDLE
for t in "${TARGETS[@]}"; do
    free_port "IN_PORT[$t]"
    free_port "OUT_PORT[$t]"
    free_port "ADMIN_PORT[$t]"
done

log "upstream and sink collector: nginx on 127.0.0.1:$UP_PORT"
start_nginx upstream "$UP_PORT" '
        default_type text/plain;
        location / { return 200 "ok\n"; }
        # The OTLP/HTTP sink: every export is answered 200, its body discarded.
        location = /v1/traces { client_max_body_size 0; return 200; }'
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -X POST \
    -H 'content-type: application/x-protobuf' --data-binary 'x' "http://127.0.0.1:$UP_PORT/v1/traces" || true)
[[ "$code" == 200 ]] || die "the sink collector answered '$code' to a POST, expected 200"

log "hung collector on 127.0.0.1:$HUNG_PORT (accepts, never answers)"
cat >"$TMP/hung-collector.py" <<'EOF'
# Accepts connections and holds them open: never reads, never answers.
import socket
import sys

server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(128)
held = []
while True:
    conn, _ = server.accept()
    held.append(conn)
EOF
"$PYTHON" "$TMP/hung-collector.py" "$HUNG_PORT" >"$TMP/hung-collector.log" 2>&1 &
HUNG_PID=$!
PIDS+=("$HUNG_PID")
for _ in $(seq 200); do
    kill -0 "$HUNG_PID" 2>/dev/null || die "the hung collector exited during start-up"
    (exec 3<>"/dev/tcp/127.0.0.1/$HUNG_PORT") 2>/dev/null && break
    sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$HUNG_PORT") 2>/dev/null || die "the hung collector does not listen on $HUNG_PORT"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$HUNG_PORT/v1/traces" || true)
[[ "$code" == 000 ]] || die "the hung collector answered '$code'; it must not answer"

declare -A SIDECAR_FLAGS=(
    [off]="--tracing off"
    [on]="--tracing on --trace-endpoint http://127.0.0.1:$UP_PORT"
    [hung]="--tracing on --trace-endpoint http://127.0.0.1:$HUNG_PORT"
    [baseline]=""
)
for t in "${TARGETS[@]}"; do
    bin=$SIDECAR
    [[ $t != baseline ]] || bin=$BASELINE
    read -r -a flags <<<"${SIDECAR_FLAGS[$t]}"
    log "sidecar $t: inbound 127.0.0.1:${IN_PORT[$t]} -> app $UP_PORT, admin ${ADMIN_PORT[$t]}${flags[*]:+, ${flags[*]}}"
    start_sidecar "sidecar-$t" "$bin" "$UP_PORT" "${IN_PORT[$t]}" "${OUT_PORT[$t]}" "${ADMIN_PORT[$t]}" ${flags[@]+"${flags[@]}"}
    SC_PID[$t]=$STARTED_PID
    RSS_IDLE[$t]=$(status_kb "$STARTED_PID" VmRSS)
done
collect_our_pids

# span_counters TARGET FILE: `EXPORTED DROPPED` from the target's /metrics
# (each summed over its labels, n/a when absent), the scrape kept in FILE.
span_counters() {
    curl -s --max-time 2 "http://127.0.0.1:${ADMIN_PORT[$1]}/metrics" >"$2" 2>/dev/null || : >"$2"
    awk '
        function name(s) { sub(/\{.*/, "", s); return s }
        /^#/ { next }
        name($1) == "meshlet_spans_exported_total" { e += $NF; ne++ }
        name($1) == "meshlet_spans_dropped_total"  { d += $NF; nd++ }
        END {
            printf "%s %s\n", (ne ? sprintf("%.0f", e) : "n/a"), (nd ? sprintf("%.0f", d) : "n/a")
        }' "$2"
}

# -------------------------------------------------------------- the runs --
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)

declare -A SPANS_RUNS SENT
for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${TARGETS[@]}"; do
        bench "$t" "${IN_PORT[$t]}" "$round"
        SENT[$t]=$((${SENT[$t]:-0} + REQS[$t,$round]))
        read -r exported dropped < <(span_counters "$t" "$TMP/$t-r$round-metrics.txt")
        log "$t-r$round: spans exported $exported, dropped $dropped (cumulative; requests sent so far ${SENT[$t]})"
        SPANS_RUNS[$t]+="${SPANS_RUNS[$t]:+; }r$round: $exported exported, $dropped dropped, ${SENT[$t]} requests sent"
    done
done

# One export flush (the exporter sends a batch at least every 500ms), then the
# final counters.
sleep 1
declare -A EXPORTED DROPPED RSS_PEAK
for t in "${TARGETS[@]}"; do
    read -r "EXPORTED[$t]" "DROPPED[$t]" < <(span_counters "$t" "$TMP/$t-final-metrics.txt")
done

for t in "${TARGETS[@]}"; do
    kill -0 "${SC_PID[$t]}" 2>/dev/null || die "sidecar $t exited during the benchmark"
    RSS_PEAK[$t]=$(status_kb "${SC_PID[$t]}" VmHWM)
done
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

summarize "${TARGETS[@]}"

# ----------------------------------------------------------------- report --
rows=("target|req/s|ratio to off|p50 ms|p99 ms|p50 vs off|p99 vs off|errors|RSS MiB peak (idle)|requests sent|spans exported|spans dropped")
for t in "${TARGETS[@]}"; do
    rows+=("${LABEL[$t]}|${RPS[$t]}|$(ratio "${RPS[$t]}" "${RPS[off]}")|$(ms "${P50[$t]}")|$(ms "${P99[$t]}")|$(added "${P50[$t]}" "${P50[off]}")|$(added "${P99[$t]}" "${P99[off]}")|${ERRS[$t]}|$(mib "${RSS_PEAK[$t]}") ($(mib "${RSS_IDLE[$t]}"))|${REQS[$t]}|${EXPORTED[$t]}|${DROPPED[$t]}")
done
table=$(printf '%s\n' "${rows[@]}" | md_table)

spans_lines="spans after each run (the counters are cumulative, so are the requests sent):"
for t in "${TARGETS[@]}"; do
    spans_lines+=$'\n'"- $t: ${SPANS_RUNS[$t]}"
done

per_round=()
for ((round = 1; round <= ROUNDS; round++)); do
    per_round+=("$(ratio "${RPS[on,$round]}" "${RPS[off,$round]}")")
done
on_off=$(ratio "${RPS[on]}" "${RPS[off]}")
c_on=$(awk -v r="$on_off" 'BEGIN { print (r != "n/a" && r >= 0.90) }')
overhead="tracing overhead: on/off = $on_off (target >= 0.90): $(check "$c_on"); per round: ${per_round[*]}"
if [[ "${EXPORTED[on]}" == n/a || "${EXPORTED[on]}" == 0 ]]; then
    overhead+=" -- NOTE: 'on' exported no spans (meshlet_spans_exported_total ${EXPORTED[on]}), so this build does not trace the request path yet and the ratio measures nothing"
fi
hung_line="hung collector vs off: p50 $(ms "${P50[hung]}") vs $(ms "${P50[off]}") ms ($(added "${P50[hung]}" "${P50[off]}")), p99 $(ms "${P99[hung]}") vs $(ms "${P99[off]}") ms ($(added "${P99[hung]}" "${P99[off]}")), req/s ratio $(ratio "${RPS[hung]}" "${RPS[off]}")"
baseline_line=""
if [[ -n "$BASELINE" ]]; then
    baseline_line="baseline $BASELINE: off/baseline = $(ratio "${RPS[off]}" "${RPS[baseline]}"), on/baseline = $(ratio "${RPS[on]}" "${RPS[baseline]}"); p50 off vs baseline $(added "${P50[off]}" "${P50[baseline]}") ms, p99 $(added "${P99[off]}" "${P99[baseline]}") ms"
fi
other_line=$(other_cpu_line "${TARGETS[@]}")
params="loopback, $(nproc) cores, $(uname -r); throughput: wrk -t$THREADS -c$CONNS -d$DURATION; latency: $RATE req/s fixed rate, -t1 -c$LAT_CONNS -d$DURATION; warm-up $WARMUP per run; $ROUNDS round(s) interleaved, median shown; load average $LOAD_BEFORE before, $LOAD_AFTER after; $(tool_versions)"

summary=("$overhead" "$hung_line")
[[ -z "$baseline_line" ]] || summary+=("$baseline_line")
summary+=("$other_line" "$params")

printf '\n%s\n\n%s\n\n' "$table" "$spans_lines"
printf '%s\n' "${summary[@]}"

mkdir -p "$OUT_DIR"
{
    echo "# meshlet tracing overhead benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) — $params"
    echo
    echo "$table"
    echo
    echo "$spans_lines"
    for line in "${summary[@]::${#summary[@]}-1}"; do
        echo
        echo "$line"
    done
} >"$RESULTS"
log "written to $RESULTS"
