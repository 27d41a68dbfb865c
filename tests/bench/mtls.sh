#!/usr/bin/env bash
# meshlet mTLS benchmark: two sidecar hops, plaintext vs mTLS (a script, not a
# timed test).
#
# What it measures, in one run, on loopback only (127.0.0.1): what mTLS
# between sidecars costs on a request that crosses both of them, as ratios
# between two meshes that differ in the hop A -> B.
#
#   plain  wrk -> sidecar A outbound -> sidecar B inbound -> app
#          (Host: b)   standalone sidecars, no control plane: A's --config
#                      lists service b at B's inbound address, no
#                      certificates, so the hop is plaintext HTTP/1.1 (A keeps
#                      a pool of keep-alive connections to B)
#   mtls   wrk -> sidecar A outbound -> sidecar B inbound -> app
#          (Host: b)   both sidecars registered with a control plane (service
#                      a / b, namespace default, sidecar tokens made with
#                      meshctl): each holds a workload certificate from the
#                      mesh CA, so the hop is mTLS (TLS 1.3, client
#                      certificates, B's SPIFFE id checked) carrying HTTP/2,
#                      one multiplexed connection per endpoint
#
# The app is one nginx, 1 worker, answering `200 ok\n` from memory with
# access_log off (as in run.sh); all four sidecars forward to it. wrk speaks
# HTTP/1.1 to A's outbound listener with `Host: b` (explicit mode: the Host
# names the service), so the hop between the sidecars is the only difference
# wrk's requests meet. All sidecars run with --tracing off (span recording and
# export to the control plane would otherwise be measured on the mtls side
# only). Note that the mtls side changes two things at once: TLS on the hop
# and HTTP/2 instead of HTTP/1.1 (the mesh speaks h2 only on mTLS hops), so
# the ratio is the cost of the zero-trust hop as deployed, not of TLS alone.
#
# Before the runs the script waits until A routes to b (GET through A answers
# 200) and, for mtls, until B's /metrics counts a completed inbound TLS
# handshake (meshlet_tls_handshakes_total > 0), so the runs measure the mTLS
# hop and not a plaintext one from before A got its certificate. A build
# without that metric and without the meshlet_identity_cert_* metrics has no
# mTLS: the mtls target is then measured anyway (it is a plaintext hop through
# control-plane-configured sidecars) and the table says "build has no mTLS".
# If the build has the metric but B never counts a handshake, the script
# fails: the hop is plaintext and the comparison would be a lie.
#
# The targets run in interleaved rounds (plain, mtls, plain, ...), so slow
# drifts of the machine hit both alike. Each run is the one of run.sh (shared
# helpers in lib.sh):
#   1. a short warm-up (A opens its connections to B, TLS handshakes included);
#   2. throughput: wrk closed loop, BENCH_THREADS threads x BENCH_CONNS
#      connections for BENCH_DURATION -> req/s;
#   3. latency: a fixed request rate (BENCH_RATE req/s, open loop, paced by a
#      wrk Lua script as in run.sh) over BENCH_LAT_CONNS connections for
#      BENCH_DURATION -> p50 / p99.
# B's meshlet_tls_handshakes_total is read before and after each run; the
# difference is the handshakes that run caused. After each target's runs B's
# active_connections{direction="inbound"} gauge is read and the established
# sockets on B's inbound port counted (ss); the largest over the rounds is kept.
# Every sidecar's peak RSS is its VmHWM, read after the runs (no RSS sampler:
# its wake-ups stretched the p99s, see all.sh).
#
# How to read the output:
#   req/s          median over the rounds of the closed-loop runs.
#   ratio to plain req/s / plain's req/s: what is left of the plaintext
#                  throughput with mTLS + h2 on the hop (on 2 cores the extra
#                  crypto competes with wrk, nginx and four sidecars for CPU).
#                  Per-round ratios are printed too (plain and mtls of one
#                  round ran back to back: their spread shows the noise).
#   p50 / p99 ms   medians of the latency percentiles at the fixed rate;
#                  `vs plain` is the difference to plain's: the latency the
#                  mTLS hop adds to a request crossing both sidecars.
#   errors         socket errors + responses with status >= 400 over the
#                  target's runs (a non-zero value makes its row meaningless).
#   RSS MiB A / B  peak: VmHWM of sidecar A and sidecar B.
#   requests sent  all requests the target got (warm-ups and checks included).
#   TLS handshakes the handshakes B's inbound completed during the target's
#                  runs (sum of the per-run deltas of the counter) and per 1000
#                  requests sent. With one multiplexed HTTP/2 connection per
#                  endpoint this is close to 0 (a handshake when A first
#                  connects or reconnects, not one per request or per client
#                  connection). plain: 0, or n/a when the build has no such
#                  metric. n/a for mtls: the build has no mTLS (see above).
#   B inbound conns  B's open inbound connections after the target's runs
#                  (largest over the rounds): the active_connections gauge
#                  (n/a if the build has none) / established sockets on B's
#                  inbound port (ss).
#                  plain: up to BENCH_CONNS (A's HTTP/1.1 pool); mtls: 1
#                  (A's single h2 connection) whatever the client concurrency.
# Under the table: the mTLS cost line (ratio, per-round ratios, added
# latency), the handshakes per round, the other processes' CPU during the runs
# (over BENCH_OTHER_CPU_LIMIT % of a core the numbers are skewed: rerun on a
# quiet machine) and the parameters. As in run.sh, runs differ by 10-20% in
# req/s on a 2-core machine even when it is quiet; hence the rounds and the
# medians.
#
# Usage: tests/bench/mtls.sh
#   BENCH_ROUNDS=3      rounds of the interleaved targets; medians shown
#   BENCH_BIN_DIR=DIR   take sidecar, control-plane and meshctl from DIR
#                       instead of building (default: build_bins, then the
#                       sidecar from target/dist, the others from target/release)
#   BENCH_MTLS_WAIT=20  seconds to wait for the first TLS handshake on B
#   BENCH_DURATION=10s BENCH_RATE=1000 BENCH_THREADS=1 BENCH_CONNS=32
#   BENCH_LAT_CONNS=16 BENCH_WARMUP=2s BENCH_OTHER_CPU_LIMIT=10 BENCH_KEEP=1
#                       as in run.sh
# Output: the table on stdout and in target/bench/mtls.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

ROUNDS="${BENCH_ROUNDS:-3}"
BIN_DIR="${BENCH_BIN_DIR:-}"
MTLS_WAIT="${BENCH_MTLS_WAIT:-20}"
# The helpers shared with run.sh and the other BENCH_* settings; installs the
# cleanup trap that stops every process started here.
# shellcheck source=tests/bench/lib.sh
source "$SCRIPT_DIR/lib.sh"
RESULTS="$OUT_DIR/mtls.md"

# The sidecars, the control plane and meshctl take settings from MESHLET_*
# variables too; only the flags below may configure them.
while read -r var; do unset "$var"; done < <(compgen -e MESHLET_ || true)

install_deps ss:iproute2
if [[ -n "$BIN_DIR" ]]; then
    BIN_DIR="$(cd "$BIN_DIR" && pwd)" || die "BENCH_BIN_DIR=$BENCH_BIN_DIR is not a directory"
else
    build_bins
    BIN_DIR="$ROOT/target/release"
fi
SIDECAR="$BIN_DIR/sidecar"
[[ -n "${BENCH_BIN_DIR:-}" ]] || SIDECAR="$DIST_SIDECAR"
CONTROL_PLANE="$BIN_DIR/control-plane"
MESHCTL="$BIN_DIR/meshctl"
for bin in "$SIDECAR" "$CONTROL_PLANE" "$MESHCTL"; do
    [[ -x "$bin" ]] || die "$bin is not an executable (build it, or set BENCH_BIN_DIR)"
done
make_tmp

TARGETS=(plain mtls)
declare -A LABEL=(
    [plain]="plain (standalone, HTTP/1.1 hop)"
    [mtls]="mtls (control plane, mTLS h2 hop)"
)

# --------------------------------------------------------------- services --
free_port UP_PORT
declare -A A_IN A_OUT A_ADMIN B_IN B_OUT B_ADMIN A_PID B_PID RSS_IDLE_A RSS_IDLE_B
for t in "${TARGETS[@]}"; do
    for v in A_IN A_OUT A_ADMIN B_IN B_OUT B_ADMIN; do free_port "${v}[$t]"; done
done
# Sidecars of both meshes: tracing off (see the header); the rest default.
COMMON=(--tracing off)

log "app: nginx on 127.0.0.1:$UP_PORT"
start_nginx upstream "$UP_PORT" '
        default_type text/plain;
        location / { return 200 "ok\n"; }'

# plain: B in front of the app, A knowing b from its --config.
log "plain: sidecar B (service b) inbound 127.0.0.1:${B_IN[plain]} -> app, admin ${B_ADMIN[plain]}"
start_sidecar plain-b "$SIDECAR" "$UP_PORT" "${B_IN[plain]}" "${B_OUT[plain]}" "${B_ADMIN[plain]}" \
    --service b "${COMMON[@]}"
B_PID[plain]=$STARTED_PID
cat >"$TMP/plain-mesh.yaml" <<EOF
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: b}
spec:
  endpoints:
    - address: 127.0.0.1:${B_IN[plain]}
EOF
log "plain: sidecar A (service a) outbound 127.0.0.1:${A_OUT[plain]} -> b at 127.0.0.1:${B_IN[plain]}, admin ${A_ADMIN[plain]}"
start_sidecar plain-a "$SIDECAR" "$UP_PORT" "${A_IN[plain]}" "${A_OUT[plain]}" "${A_ADMIN[plain]}" \
    --service a --config "$TMP/plain-mesh.yaml" "${COMMON[@]}"
A_PID[plain]=$STARTED_PID

# mtls: a control plane, a sidecar token per service, A and B registered.
log "mtls: control plane, data dir $TMP/cp"
start_control_plane "$CONTROL_PLANE"
for s in a b; do sidecar_token "$MESHCTL" "$s"; done
mapfile -t flags_b < <(cp_flags b)
log "mtls: sidecar B (service b) inbound 127.0.0.1:${B_IN[mtls]} -> app, admin ${B_ADMIN[mtls]}"
start_sidecar mtls-b "$SIDECAR" "$UP_PORT" "${B_IN[mtls]}" "${B_OUT[mtls]}" "${B_ADMIN[mtls]}" \
    "${flags_b[@]}" "${COMMON[@]}"
B_PID[mtls]=$STARTED_PID
mapfile -t flags_a < <(cp_flags a)
log "mtls: sidecar A (service a) outbound 127.0.0.1:${A_OUT[mtls]}, admin ${A_ADMIN[mtls]}"
start_sidecar mtls-a "$SIDECAR" "$UP_PORT" "${A_IN[mtls]}" "${A_OUT[mtls]}" "${A_ADMIN[mtls]}" \
    "${flags_a[@]}" "${COMMON[@]}"
A_PID[mtls]=$STARTED_PID

# ----------------------------------------------------------- metrics --
# metric (lib.sh): a value from a sidecar's /metrics.
# has_mtls_metrics ADMIN_PORT: whether the sidecar exports any metric of the
# mTLS work (declared families are listed in # HELP lines even before use).
has_mtls_metrics() {
    local text
    text=$(curl -s --max-time 2 "http://127.0.0.1:$1/metrics" 2>/dev/null || true)
    [[ "$text" =~ meshlet_tls_handshakes_total|meshlet_identity_cert_ ]]
}
# handshakes TARGET: B's completed inbound TLS handshakes (the series with
# direction="inbound" if the counter has that label, else all of them).
handshakes() {
    local v
    v=$(metric "${B_ADMIN[$1]}" meshlet_tls_handshakes_total 'direction="inbound"')
    [[ "$v" != n/a ]] || v=$(metric "${B_ADMIN[$1]}" meshlet_tls_handshakes_total)
    echo "$v"
}

# The plain mesh routes A -> b?
wait_http_host() { # URL HOST PID NAME SECONDS: until URL with Host: HOST answers 200
    local url=$1 host=$2 pid=$3 name=$4 code=""
    for _ in $(seq $(($5 * 10))); do
        kill -0 "$pid" 2>/dev/null || die "$name exited"
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 -H "Host: $host" "$url" || true)
        [[ "$code" == 200 ]] && return 0
        sleep 0.1
    done
    die "$name: $url with Host: $host answered '${code:-nothing}' for $5s"
}
wait_http_host "http://127.0.0.1:${A_OUT[plain]}/" b "${A_PID[plain]}" "plain: sidecar A" 20

# The mtls mesh routes A -> b, over mTLS? (see the header)
wait_http_host "http://127.0.0.1:${A_OUT[mtls]}/" b "${A_PID[mtls]}" "mtls: sidecar A (routing to b from the control plane)" 30
MTLS_NOTE=""
hs=n/a
start=$SECONDS
while ((SECONDS - start < MTLS_WAIT)); do
    hs=$(handshakes mtls)
    [[ "$hs" == n/a || "$hs" == 0 ]] || break
    if [[ "$hs" == n/a ]] && ((SECONDS - start >= 3)) &&
        ! has_mtls_metrics "${B_ADMIN[mtls]}" && ! has_mtls_metrics "${A_ADMIN[mtls]}"; then
        break # neither sidecar has any metric of the mTLS work: nothing to wait for
    fi
    # A request through A, so that A connects (again) once it holds a certificate.
    curl -s -o /dev/null --max-time 1 -H 'Host: b' "http://127.0.0.1:${A_OUT[mtls]}/" || true
    sleep 0.2
done
if [[ "$hs" == n/a ]]; then
    if has_mtls_metrics "${B_ADMIN[mtls]}" || has_mtls_metrics "${A_ADMIN[mtls]}"; then
        MTLS_NOTE="build exports no meshlet_tls_handshakes_total"
    else
        MTLS_NOTE="build has no mTLS"
    fi
    log "WARNING: B's /metrics has no meshlet_tls_handshakes_total ($MTLS_NOTE): the mtls target is measured, its handshakes are n/a"
    [[ "$MTLS_NOTE" != "build has no mTLS" ]] || LABEL[mtls]="mtls (control plane; build has no mTLS: plaintext hop)"
elif [[ "$hs" == 0 ]]; then
    die "B's inbound counted no TLS handshake in ${MTLS_WAIT}s although A routes to b: the hop is plaintext (A has no certificate, or b's endpoint no identity); see $TMP/mtls-a.log"
else
    log "mtls: B's inbound completed $hs TLS handshake(s): the hop A -> b is mTLS"
fi

for t in "${TARGETS[@]}"; do
    RSS_IDLE_A[$t]=$(status_kb "${A_PID[$t]}" VmRSS)
    RSS_IDLE_B[$t]=$(status_kb "${B_PID[$t]}" VmRSS)
done

# read_conns TARGET: B's active_connections{direction="inbound"} gauge and the
# established sockets on B's inbound port, read right after the target's runs
# (A's pooled connections to B stay open for the pool's idle timeout, so this
# is what the runs opened), the largest over the rounds kept in CONNS_G and
# CONNS_S. Read between runs, never during one: a sampler that ran curl and ss
# every 0.25 s stretched the latency runs' p99s (as all.sh's RSS sampler did).
declare -A CONNS_G CONNS_S
read_conns() {
    local t=$1 g s
    g=$(metric "${B_ADMIN[$t]}" active_connections 'direction="inbound"')
    s=$(ss -Htn state established "( sport = :${B_IN[$t]} )" 2>/dev/null | wc -l)
    if [[ "$g" == n/a || "${CONNS_G[$t]:-}" == n/a ]]; then
        CONNS_G[$t]=n/a
    elif ((g > ${CONNS_G[$t]:--1})); then
        CONNS_G[$t]=$g
    fi
    ((s > ${CONNS_S[$t]:-0})) || s=${CONNS_S[$t]:-0}
    CONNS_S[$t]=$s
}
collect_our_pids

# -------------------------------------------------------------- the runs --
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)

declare -A HS_SUM HS_RUNS
for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${TARGETS[@]}"; do
        before=$(handshakes "$t")
        bench "$t" "${A_OUT[$t]}" "$round" b
        after=$(handshakes "$t")
        read_conns "$t"
        if [[ "$before" == n/a || "$after" == n/a ]]; then
            delta=n/a
            HS_SUM[$t]=n/a
        else
            delta=$((after - before))
            [[ "${HS_SUM[$t]:-0}" == n/a ]] || HS_SUM[$t]=$((${HS_SUM[$t]:-0} + delta))
        fi
        per=n/a
        [[ "$delta" == n/a ]] || per=$(awk -v h="$delta" -v r="${REQS[$t,$round]}" 'BEGIN { printf "%.3f", h / r * 1000 }')
        log "$t-r$round: B's inbound TLS handshakes $delta for ${REQS[$t,$round]} requests ($per per 1000)"
        HS_RUNS[$t]+="${HS_RUNS[$t]:+; }r$round: $delta handshakes / ${REQS[$t,$round]} requests ($per per 1000)"
    done
done

declare -A RSS_A RSS_B
for t in "${TARGETS[@]}"; do
    for side in A B; do
        pid_var="${side}_PID[$t]"
        pid=${!pid_var}
        kill -0 "$pid" 2>/dev/null || die "sidecar $side of $t exited during the benchmark"
        printf -v "RSS_${side}[$t]" '%s' "$(status_kb "$pid" VmHWM)"
    done
done
kill -0 "$CP_PID" 2>/dev/null || die "the control plane exited during the benchmark"
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

summarize "${TARGETS[@]}"

# ----------------------------------------------------------------- report --
hs_cells() { # hs_cells TARGET: `HANDSHAKES|PER 1000`
    local t=$1
    if [[ "${HS_SUM[$t]:-n/a}" == n/a ]]; then
        if [[ $t == mtls && -n "$MTLS_NOTE" ]]; then
            echo "n/a ($MTLS_NOTE)|n/a"
        else
            echo "n/a|n/a"
        fi
    else
        echo "${HS_SUM[$t]}|$(awk -v h="${HS_SUM[$t]}" -v r="${REQS[$t]}" 'BEGIN { printf "%.3f", h / r * 1000 }')"
    fi
}
rows=("target|req/s|ratio to plain|p50 ms|p99 ms|p50 vs plain|p99 vs plain|errors|RSS MiB A / B peak|requests sent|TLS handshakes on B|handshakes per 1000 requests|B inbound conns after the runs (gauge / sockets)")
for t in "${TARGETS[@]}"; do
    rows+=("${LABEL[$t]}|${RPS[$t]}|$(ratio "${RPS[$t]}" "${RPS[plain]}")|$(ms "${P50[$t]}")|$(ms "${P99[$t]}")|$(added "${P50[$t]}" "${P50[plain]}")|$(added "${P99[$t]}" "${P99[plain]}")|${ERRS[$t]}|$(mib "${RSS_A[$t]}") / $(mib "${RSS_B[$t]}")|${REQS[$t]}|$(hs_cells "$t")|${CONNS_G[$t]} / ${CONNS_S[$t]}")
done
table=$(printf '%s\n' "${rows[@]}" | md_table)

per_round=()
for ((round = 1; round <= ROUNDS; round++)); do
    per_round+=("$(ratio "${RPS[mtls,$round]}" "${RPS[plain,$round]}")")
done
cost="mTLS cost: mtls/plain req/s = $(ratio "${RPS[mtls]}" "${RPS[plain]}") (per round: ${per_round[*]}); added latency p50 $(added "${P50[mtls]}" "${P50[plain]}") ms, p99 $(added "${P99[mtls]}" "${P99[plain]}") ms"
[[ -z "$MTLS_NOTE" ]] || cost+=" -- NOTE: $MTLS_NOTE, so this compares two plaintext meshes"
hs_lines="TLS handshakes on B's inbound per run (counter deltas; requests: all the run sent):"
for t in "${TARGETS[@]}"; do
    hs_lines+=$'\n'"- $t: ${HS_RUNS[$t]}; B's counter at the end (set-up included): $(handshakes "$t")"
done
rss_idle="RSS when idle, before load (MiB, A / B): plain $(mib "${RSS_IDLE_A[plain]}") / $(mib "${RSS_IDLE_B[plain]}"), mtls $(mib "${RSS_IDLE_A[mtls]}") / $(mib "${RSS_IDLE_B[mtls]}")"
other_line=$(other_cpu_line "${TARGETS[@]}")
params="loopback, $(nproc) cores, $(uname -r); binaries: $BIN_DIR; throughput: wrk -t$THREADS -c$CONNS -d$DURATION; latency: $RATE req/s fixed rate, -t1 -c$LAT_CONNS -d$DURATION; warm-up $WARMUP per run; $ROUNDS round(s) interleaved, median shown; load average $LOAD_BEFORE before, $LOAD_AFTER after; $(tool_versions)"

summary=("$cost" "$rss_idle" "$other_line" "$params")
printf '\n%s\n\n%s\n\n' "$table" "$hs_lines"
printf '%s\n' "${summary[@]}"

mkdir -p "$OUT_DIR"
{
    echo "# meshlet mTLS benchmark: two hops, plaintext vs mTLS"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) — $params"
    echo
    echo "$table"
    echo
    echo "$hs_lines"
    for line in "${summary[@]::${#summary[@]}-1}"; do
        echo
        echo "$line"
    done
} >"$RESULTS"
log "written to $RESULTS"
