#!/usr/bin/env bash
# Every row of issue 17's performance table in one run (a script, not a
# timed test; CI does not run it).
#
# Loopback only (127.0.0.1). Placement: the clients (wrk) and the apps on
# core 0 (`taskset -c 0`), the proxies (nginx, haproxy, the sidecars) alone
# on core 1; the control plane on core 0 (it idles during the runs). Needs
# 2 cores; with BENCH_PIN=0 nothing is pinned.
#
# Rows (all against the same apps, one after another, in one run):
#   one hop, app = nginx answering `200 ok\n` (1 worker, access_log off):
#     direct                   wrk -> app
#     nginx                    wrk -> nginx (1 worker, upstream keepalive 64) -> app
#     haproxy                  wrk -> haproxy (nbthread 1, http-reuse always) -> app
#     haproxy, busy-polling    the same with HAProxy's `busy-polling` (its
#                              pollers never sleep: the production proxy's own
#                              answer to VM wake-up latency, the baseline for
#                              the sidecar's --busy-poll)
#     sidecar                  wrk -> sidecar inbound -> app (the PGO build of
#                              tests/bench/pgo.sh, target/pgo/sidecar; defaults:
#                              metrics on, tracing on, no control plane)
#     sidecar (baseline)       the same with the baseline build: the dist build
#                              without PGO (target/dist/sidecar), or
#                              BENCH_SIDECAR_BASELINE when set
#     sidecar, --busy-poll     the same with --busy-poll 200us (polls for a
#                              response instead of sleeping: lower latency at
#                              c=1 for more CPU; off by default)
#     sidecar, --busy-poll 2ms the same with a window longer than the gap
#                              between requests at BENCH_RATE: it polls all
#                              through the fixed-rate run, and not when idle
#     sidecar + policies       the same with a RateLimitPolicy (a bucket too big
#                              to refuse), a CircuitBreakerPolicy, a RetryPolicy
#                              and a TimeoutPolicy for its service (--config);
#                              inbound, the rate limit is the one that applies
#                              (goal 1 is checked on this row)
#   Nagle app: Python's http.server (tests/e2e/fixtures/nagle_app.py: HTTP/1.1
#   keep-alive, Nagle on, head and body written apart), latency runs only:
#     direct, new connections  curl, BENCH_CLOSE_REQUESTS (300) GETs one after
#                              another with `Connection: close` -> app (a new
#                              connection starts in quick-ACK mode: no stall)
#     direct, kept alive       wrk -c1 -> app (wrk's own delayed ACK stalls)
#     sidecar / nginx          wrk -c1 -> proxy -> app, the proxy's upstream
#                              connection reused
#   two hops (client -> outbound sidecar -> inbound sidecar -> app):
#     two nginx hops           wrk -> nginx A -> nginx B -> app (both keepalive)
#     sidecars, plaintext      wrk (Host: b) -> sidecar A outbound -> sidecar B
#                              inbound -> app; A knows b from --config; HTTP/1.1 hop
#     sidecars, mTLS           the same with both registered with a control
#                              plane: mTLS + HTTP/2 hop (as mtls.sh)
#     sidecars, mTLS,          the mTLS hops with --busy-poll 2ms on the
#       --busy-poll 2ms        inbound sidecar only (its next requests come
#                              over HTTP/2), and on both (services c -> d,
#                              e -> f; Host: d, f)
#     sidecars, plaintext +    the plaintext hops with the four policies for b:
#       policies               breaker, retry and timeout on A's outbound, the
#                              rate limit on B's inbound, tracing on
#
# Per row: a warm-up (BENCH_WARMUP), a throughput run (wrk -t1 -c32,
# BENCH_DURATION, keep-alive), a latency run (wrk -t1 -c1, closed loop,
# BENCH_DURATION) and, for the one- and two-hop rows, an open-loop run at a
# fixed BENCH_RATE (default 1000 req/s, wrk -c BENCH_LAT_CONNS with lib.sh's
# paced script). The proxies' CPU (utime + stime from /proc/PID/stat, all
# their processes) is read around the throughput and the fixed-rate runs.
# The sidecars' peak RSS is their VmHWM after the runs (each idles while the
# others run: the peak is its peak under its own load, or at start-up if
# that was higher). B's meshlet_tls_handshakes_total is read around the
# mTLS runs.
#
# How to read the table:
#   req/s            closed-loop throughput, -t1 -c32 (Nagle rows: the c=1 rate)
#   x direct         req/s / direct's
#   x nginx          req/s / the nginx row with the same number of hops (>= 1:
#                    at least as fast as nginx doing the same job)
#   p50 / p99 ms     latency at c=1 (one request at a time)
#   added p50/p99    minus the baseline's: one hop and two hops against
#                    direct, Nagle rows against "direct, new connections"
#   CPU us/req       the proxies' CPU time per request in the throughput run
#   CPU us/req at c=1  the same in the c=1 latency run (a proxy that polls
#                    instead of sleeping spends its waits here)
#   at N/s           the fixed-rate run: added p50 / p99 against direct's, and
#                    the proxies' CPU per request at that rate (they idle
#                    between requests: waking up is part of the cost)
#                    (both hops for two-hop rows; softirq work charged to
#                    other processes is not in it)
#   RSS MiB          sidecars: idle before the runs / peak under load (two
#                    hops: the larger of A and B)
#   TLS hs/1k req    handshakes on B's inbound per 1000 requests: ~0 when
#                    connections are reused
#   errors           socket errors + status >= 400 (non-zero: row meaningless)
# Paired throughput (goal 1): this VM runs at one of two speeds for
# seconds at a time (nginx ~61k or ~49k req/s), and rows measured ~30 s
# apart can land in different ones, which moves a ratio of medians by 20 %.
# So after the rounds, BENCH_PAIRS times: nginx, the sidecar, the sidecar
# with policies (and the baseline build) back to back, BENCH_PAIR_DURATION
# each, the order rotated every time; the ratio of each run to the nginx
# run of its own pair, for req/s and for CPU per request (and its user-space
# part alone, which moves least between runs), median and range over the
# pairs. Goal 1 is judged on the paired median when there is one.
# Each pair also has nginx and the sidecar answering a POST with a
# BENCH_POST_BYTES body (default 256, sent with its head, as API clients
# do; and the baseline build's, when set), each run against the POST run
# of nginx in its pair: a body must not cost the sidecar more than it
# costs nginx.
#
# Then the goals of issue 17 (met / MISSED), the other processes' CPU during
# the runs (on a shared machine: over BENCH_OTHER_CPU_LIMIT % the numbers are
# skewed), the control plane at scale (tests/bench/control-plane-scale.sh's
# fragment, when that script exists) and the parameters.
#
# Usage: bash tests/bench/all.sh    (~27 minutes from scratch on 2 cores:
#                                    the builds with PGO ~10, the rows ~15 with
#                                    3 rounds and 12 pairs, the control plane ~5)
#   BENCH_DURATION=5s   each throughput and latency run
#   BENCH_WARMUP=1s     warm-up per row
#   BENCH_CONNS=32      connections of the throughput runs
#   BENCH_ROUNDS=1      repeat all rows, interleaved; medians shown
#   BENCH_PAIRS=8       paired throughput runs for goal 1 (0: none; see below)
#   BENCH_PAIR_DURATION=2s  each run of a pair
#   BENCH_POST_BYTES=256    the body of the paired POST runs (0: no POST runs)
#   BENCH_PGO=1         measure the sidecar built with profile-guided
#                       optimisation (tests/bench/pgo.sh, ~8 min more to
#                       build) and the dist build without it as the baseline;
#                       0: the dist build, no baseline unless given
#   BENCH_SIDECAR_BASELINE=PATH  measure this sidecar build (e.g. main's, or
#                       one without a change) as the baseline in the one-hop
#                       and Nagle rows and the pairs
#   BENCH_BIN_DIR=DIR   sidecar, control-plane, meshctl from DIR (no build,
#                       no PGO; default: build_bins, then pgo.sh)
#   BENCH_PIN=0         no CPU pinning
#   BENCH_CP_SCALE=0    skip tests/bench/control-plane-scale.sh
#   BENCH_OTHER_CPU_LIMIT=10  BENCH_KEEP=1   as in run.sh
# Output: the table on stdout, target/bench/results.md, target/bench/chart.png.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

: "${BENCH_DURATION:=5s}" "${BENCH_WARMUP:=1s}"
export BENCH_DURATION BENCH_WARMUP
ROUNDS="${BENCH_ROUNDS:-1}"
BIN_DIR="${BENCH_BIN_DIR:-}"
BASELINE="${BENCH_SIDECAR_BASELINE:-}"
PIN="${BENCH_PIN:-1}"
# shellcheck source=tests/bench/lib.sh
source "$SCRIPT_DIR/lib.sh"
RESULTS="$OUT_DIR/results.md"
CHART="$OUT_DIR/chart.png"
NAGLE_APP="$ROOT/tests/e2e/fixtures/nagle_app.py"

# Only the flags below configure the sidecars and the control plane.
while read -r var; do unset "$var"; done < <(compgen -e MESHLET_ || true)

install_deps haproxy:haproxy gnuplot:gnuplot-nox python3:python3 taskset:util-linux
if [[ -n "$BIN_DIR" ]]; then
    BIN_DIR="$(cd "$BIN_DIR" && pwd)" || die "BENCH_BIN_DIR=$BENCH_BIN_DIR is not a directory"
else
    build_bins
    BIN_DIR="$ROOT/target/release"
fi
SIDECAR="$BIN_DIR/sidecar"
if [[ -z "${BENCH_BIN_DIR:-}" ]]; then
    SIDECAR="$DIST_SIDECAR"
    if [[ "${BENCH_PGO:-1}" == 1 ]]; then
        # The build measured is the PGO one; the same code without PGO is the
        # baseline, so every run shows what PGO buys.
        SIDECAR=$(PGO_SKIP_BUILD=1 bash "$SCRIPT_DIR/pgo.sh")
        BASELINE="${BASELINE:-$DIST_SIDECAR}"
    fi
fi
for bin in "$SIDECAR" "$BIN_DIR/control-plane" "$BIN_DIR/meshctl" ${BASELINE:+"$BASELINE"}; do
    [[ -x "$bin" ]] || die "$bin is not an executable"
done
if [[ "$PIN" == 1 ]]; then
    (($(nproc) >= 2)) || die "pinning needs 2 cores (BENCH_PIN=0 to run unpinned)"
    CLIENT_PIN=(taskset -c 0)
fi
make_tmp

# pin CORE PID: moves PID, its threads and its children (nginx workers) to CORE.
pin() {
    [[ "$PIN" == 1 ]] || return 0
    local p
    for p in "$2" $(pgrep -P "$2" || true); do
        taskset -a -c -p "$1" "$p" >/dev/null
    done
}
APP_CORE=0 PROXY_CORE=1

# ------------------------------------------------------------- services --
# Every row: ROW_PORT, ROW_HOST (Host header, or empty), ROW_PROCS (the
# proxy processes whose CPU is counted), ROW_KIND (full: throughput +
# latency; latency: c=1 only), ROW_CLOSE (1: `Connection: close`, a new
# connection per request).
declare -A ROW_PORT ROW_HOST ROW_PROCS ROW_KIND ROW_CLOSE LABEL
ROWS=()
add_row() { # add_row NAME LABEL PORT KIND PROCS [HOST]
    ROWS+=("$1")
    LABEL[$1]=$2 ROW_PORT[$1]=$3 ROW_KIND[$1]=$4 ROW_PROCS[$1]=$5 ROW_HOST[$1]=${6:-}
}

free_port APP_PORT
# shellcheck disable=SC2153 # free_port sets it
log "app: nginx on 127.0.0.1:$APP_PORT"
start_nginx app "$APP_PORT" '
        default_type text/plain;
        location / { return 200 "ok\n"; }'
pin "$APP_CORE" "$APP_PID"

free_port NAGLE_PORT
log "Nagle app: python3 http.server on 127.0.0.1:$NAGLE_PORT"
"${CLIENT_PIN[@]}" python3 "$NAGLE_APP" "$NAGLE_PORT" >"$TMP/nagle-app.log" 2>&1 &
NAGLE_PID=$!
PIDS+=("$NAGLE_PID")
wait_http "http://127.0.0.1:$NAGLE_PORT/" "$NAGLE_PID" "the Nagle app"

# nginx_proxy NAME PORT UPSTREAM_PORT: an nginx proxy with an upstream
# keep-alive pool, on the proxy core.
nginx_proxy() {
    start_nginx_proxy "$1" "$2" "$3"
    local var="${1^^}_PID"
    pin "$PROXY_CORE" "${!var}"
}

free_port NGINX_PORT
nginx_proxy nginx "$NGINX_PORT" "$APP_PORT"

free_port HAPROXY_PORT
cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 75s
    timeout server 75s
    http-reuse always
frontend bench
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend app
backend app
    server app 127.0.0.1:$APP_PORT
EOF
haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")
wait_http "http://127.0.0.1:$HAPROXY_PORT/" "$HAPROXY_PID" haproxy
pin "$PROXY_CORE" "$HAPROXY_PID"

# The same haproxy with `busy-polling` (global): it never sleeps in its
# poller, whether anything is awaited or not.
free_port HAPROXY_BP_PORT
sed -e "s/^    nbthread 1$/    nbthread 1\n    busy-polling/" -e "s/127.0.0.1:$HAPROXY_PORT$/127.0.0.1:$HAPROXY_BP_PORT/" \
    "$TMP/haproxy.cfg" >"$TMP/haproxy-bp.cfg"
grep -q '^    busy-polling$' "$TMP/haproxy-bp.cfg" || die "haproxy-bp.cfg lacks busy-polling"
haproxy -db -f "$TMP/haproxy-bp.cfg" >"$TMP/haproxy-bp.log" 2>&1 &
HAPROXY_BP_PID=$!
PIDS+=("$HAPROXY_BP_PID")
wait_http "http://127.0.0.1:$HAPROXY_BP_PORT/" "$HAPROXY_BP_PID" "haproxy (busy-polling)"
pin "$PROXY_CORE" "$HAPROXY_BP_PID"
# It would take the proxy core from every other row: paused (SIGSTOP) but
# for its own runs (measure and idle_cpu resume it).
kill -STOP "$HAPROXY_BP_PID"

# sidecar NAME BINARY APP_PORT [ARGS...]: a sidecar in front of APP_PORT on
# the proxy core. Sets SC_IN[NAME], SC_OUT[NAME], SC_ADMIN[NAME], SC_PID[NAME].
declare -A SC_IN SC_OUT SC_ADMIN SC_PID RSS_IDLE
sidecar() {
    local name=$1 bin=$2 app=$3 in out admin
    shift 3
    free_port in
    free_port out
    free_port admin
    start_sidecar "$name" "$bin" "$app" "$in" "$out" "$admin" "$@"
    SC_IN[$name]=$in SC_OUT[$name]=$out SC_ADMIN[$name]=$admin SC_PID[$name]=$STARTED_PID
    pin "$PROXY_CORE" "$STARTED_PID"
}

log "one hop: sidecar inbound -> app"
sidecar sidecar "$SIDECAR" "$APP_PORT"
policies bench >"$TMP/one-hop-policies.yaml"
sidecar policies "$SIDECAR" "$APP_PORT" --config "$TMP/one-hop-policies.yaml"
[[ -z "$BASELINE" ]] || sidecar baseline "$BASELINE" "$APP_PORT"
sidecar busy-poll "$SIDECAR" "$APP_PORT" --busy-poll 200us
sidecar busy-poll-2ms "$SIDECAR" "$APP_PORT" --busy-poll 2ms

log "Nagle: nginx and sidecar(s) in front of the Python app"
free_port NAGLE_NGINX_PORT
nginx_proxy nagle_nginx "$NAGLE_NGINX_PORT" "$NAGLE_PORT"
sidecar nagle-sidecar "$SIDECAR" "$NAGLE_PORT"
[[ -z "$BASELINE" ]] || sidecar nagle-baseline "$BASELINE" "$NAGLE_PORT"

log "two hops: nginx A -> nginx B -> app"
free_port HOP_B_PORT
nginx_proxy hop_b "$HOP_B_PORT" "$APP_PORT"
free_port HOP_A_PORT
nginx_proxy hop_a "$HOP_A_PORT" "$HOP_B_PORT"

log "two hops: sidecars, plaintext (standalone)"
sidecar plain-b "$SIDECAR" "$APP_PORT" --service b --tracing off
cat >"$TMP/plain-mesh.yaml" <<EOF
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: b}
spec:
  endpoints:
    - address: 127.0.0.1:${SC_IN[plain-b]}
EOF
sidecar plain-a "$SIDECAR" "$APP_PORT" --service a --config "$TMP/plain-mesh.yaml" --tracing off

log "two hops: sidecars, plaintext + policies (standalone, tracing on)"
policies b >"$TMP/pol-b.yaml"
sidecar pol-b "$SIDECAR" "$APP_PORT" --service b --config "$TMP/pol-b.yaml"
{
    echo "apiVersion: meshlet.dev/v1alpha1"
    echo "kind: Service"
    echo "metadata: {name: b}"
    echo "spec:"
    echo "  endpoints:"
    echo "    - address: 127.0.0.1:${SC_IN[pol-b]}"
    echo "---"
    cat "$TMP/pol-b.yaml"
} >"$TMP/pol-mesh.yaml"
sidecar pol-a "$SIDECAR" "$APP_PORT" --service a --config "$TMP/pol-mesh.yaml"

log "two hops: sidecars, mTLS (control plane)"
start_control_plane "$BIN_DIR/control-plane"
pin "$APP_CORE" "$CP_PID"
for s in a b; do sidecar_token "$BIN_DIR/meshctl" "$s"; done
mapfile -t flags < <(cp_flags b)
sidecar mtls-b "$SIDECAR" "$APP_PORT" "${flags[@]}" --tracing off
mapfile -t flags < <(cp_flags a)
sidecar mtls-a "$SIDECAR" "$APP_PORT" "${flags[@]}" --tracing off

# The same mTLS hop with --busy-poll 2ms: c -> d with it on the inbound
# sidecar only (d: its next requests arrive over the HTTP/2 hop, its
# responses from the app), e -> f with it on both. All four share the proxy
# core with the other sidecars, as the plain mtls pair does.
log "two hops: sidecars, mTLS, --busy-poll 2ms (inbound only; both)"
for s in c d e f; do sidecar_token "$BIN_DIR/meshctl" "$s"; done
mapfile -t flags < <(cp_flags d)
sidecar bpin-b "$SIDECAR" "$APP_PORT" "${flags[@]}" --tracing off --busy-poll 2ms
mapfile -t flags < <(cp_flags c)
sidecar bpin-a "$SIDECAR" "$APP_PORT" "${flags[@]}" --tracing off
mapfile -t flags < <(cp_flags f)
sidecar bp-b "$SIDECAR" "$APP_PORT" "${flags[@]}" --tracing off --busy-poll 2ms
mapfile -t flags < <(cp_flags e)
sidecar bp-a "$SIDECAR" "$APP_PORT" "${flags[@]}" --tracing off --busy-poll 2ms

# wait_route PORT HOST NAME: until a GET with Host: HOST answers 200 (30s).
wait_route() {
    local code=""
    for _ in $(seq 300); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 -H "Host: $2" "http://127.0.0.1:$1/" || true)
        [[ "$code" == 200 ]] && return 0
        sleep 0.1
    done
    die "$3: GET with Host: $2 answered '${code:-nothing}' for 30s"
}
wait_route "${SC_OUT[plain-a]}" b "plain: sidecar A"
wait_route "${SC_OUT[pol-a]}" b "policies: sidecar A"
wait_route "${SC_OUT[mtls-a]}" b "mtls: sidecar A"
wait_route "${SC_OUT[bpin-a]}" d "mtls, busy-poll on the inbound: sidecar A"
wait_route "${SC_OUT[bp-a]}" f "mtls, busy-poll on both: sidecar A"
# The hop must be mTLS before the runs: B counts a completed handshake.
handshakes() { metric "${SC_ADMIN[mtls-b]}" meshlet_tls_handshakes_total 'direction="inbound"'; }
# wait_mtls_hop A B HOST: until sidecar B's inbound counts a completed TLS
# handshake (20 s), sending GETs with Host: HOST through sidecar A.
wait_mtls_hop() {
    local hs=n/a
    for _ in $(seq 100); do
        hs=$(metric "${SC_ADMIN[$2]}" meshlet_tls_handshakes_total 'direction="inbound"')
        [[ "$hs" == n/a || "$hs" == 0 ]] || break
        curl -s -o /dev/null --max-time 1 -H "Host: $3" "http://127.0.0.1:${SC_OUT[$1]}/" || true
        sleep 0.2
    done
    [[ "$hs" != n/a && "$hs" != 0 ]] || die "$2's inbound counted no TLS handshake in 20s: the hop is not mTLS (see $TMP/$1.log)"
    log "$1 -> $2: $2's inbound completed $hs TLS handshake(s)"
}
wait_mtls_hop mtls-a mtls-b b
wait_mtls_hop bpin-a bpin-b d
wait_mtls_hop bp-a bp-b f

for name in "${!SC_PID[@]}"; do RSS_IDLE[$name]=$(status_kb "${SC_PID[$name]}" VmRSS); done

nginx_procs() { local v="${1^^}_PID"; echo "${!v} $(pgrep -P "${!v}" | tr '\n' ' ')"; }
add_row direct "direct" "$APP_PORT" full ""
add_row nginx "nginx, 1 worker, upstream keepalive" "$NGINX_PORT" full "$(nginx_procs nginx)"
add_row haproxy "haproxy, 1 thread" "$HAPROXY_PORT" full "$HAPROXY_PID"
add_row haproxy-bp "haproxy, 1 thread, busy-polling" "$HAPROXY_BP_PORT" full "$HAPROXY_BP_PID"
add_row sidecar "sidecar inbound -> app" "${SC_IN[sidecar]}" full "${SC_PID[sidecar]}"
[[ -z "$BASELINE" ]] || add_row baseline "sidecar inbound -> app (baseline build)" "${SC_IN[baseline]}" full "${SC_PID[baseline]}"
add_row policies "sidecar + policies (rate limit, breaker, retry, timeout)" "${SC_IN[policies]}" full "${SC_PID[policies]}"
add_row busy-poll "sidecar inbound -> app, --busy-poll 200us" "${SC_IN[busy-poll]}" full "${SC_PID[busy-poll]}"
add_row busy-poll-2ms "sidecar inbound -> app, --busy-poll 2ms" "${SC_IN[busy-poll-2ms]}" full "${SC_PID[busy-poll-2ms]}"
add_row nagle-direct "Nagle app: direct, new connection per request" "$NAGLE_PORT" latency ""
ROW_CLOSE[nagle-direct]=1
add_row nagle-direct-ka "Nagle app: direct, kept alive" "$NAGLE_PORT" latency ""
add_row nagle-sidecar "Nagle app: via sidecar" "${SC_IN[nagle-sidecar]}" latency "${SC_PID[nagle-sidecar]}"
[[ -z "$BASELINE" ]] || add_row nagle-baseline "Nagle app: via sidecar (baseline build)" "${SC_IN[nagle-baseline]}" latency "${SC_PID[nagle-baseline]}"
add_row nagle-nginx "Nagle app: via nginx" "$NAGLE_NGINX_PORT" latency "$(nginx_procs nagle_nginx)"
add_row hop2-nginx "two hops: nginx -> nginx" "$HOP_A_PORT" full "$(nginx_procs hop_a) $(nginx_procs hop_b)"
add_row hop2-plain "two hops: sidecars, plaintext" "${SC_OUT[plain-a]}" full "${SC_PID[plain-a]} ${SC_PID[plain-b]}" b
add_row hop2-mtls "two hops: sidecars, mTLS" "${SC_OUT[mtls-a]}" full "${SC_PID[mtls-a]} ${SC_PID[mtls-b]}" b
add_row hop2-mtls-bpin "two hops: sidecars, mTLS, --busy-poll 2ms on the inbound" "${SC_OUT[bpin-a]}" full "${SC_PID[bpin-a]} ${SC_PID[bpin-b]}" d
add_row hop2-mtls-bp "two hops: sidecars, mTLS, --busy-poll 2ms on both" "${SC_OUT[bp-a]}" full "${SC_PID[bp-a]} ${SC_PID[bp-b]}" f
add_row hop2-pol "two hops: sidecars, plaintext + policies, tracing on" "${SC_OUT[pol-a]}" full "${SC_PID[pol-a]} ${SC_PID[pol-b]}" b

collect_our_pids
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
# Peak RSS is the kernel's high-water mark (VmHWM), read after the runs. No
# sampler runs during them: a loop reading /proc/PID/status every 0.2 s (a
# `sleep` process each time) stretched every proxy's c=1 p99 from ~0.2-0.5 ms
# to ~1.2-1.6 ms (all.sh with and without it, 2026-12-06), and its largest
# sample can never exceed VmHWM anyway.

# --------------------------------------------------------------- the runs --
# ticks [--user] PIDS...: their utime + stime (--user: utime alone), in
# clock ticks.
ticks() {
    local p f sum=0 system=1
    [[ ${1:-} != --user ]] || { system=0; shift; }
    for p in "$@"; do
        read -r -a f 2>/dev/null <"/proc/$p/stat" || continue
        sum=$((sum + f[13] + system * f[14]))
    done
    echo "$sum"
}

# curl_lat OUT URL N: N GETs one after another, each on a new connection
# (`Connection: close`; wrk counts the server's closes as socket errors), as
# a RESULT line like report.lua's (curl's time_total: connect to last byte).
curl_lat() {
    local out=$1 url=$2 n=$3 start end
    local -a urls=()
    for _ in $(seq "$n"); do urls+=(-o /dev/null "$url"); done
    start=$(date +%s%N)
    "${CLIENT_PIN[@]}" curl -s -H 'Connection: close' -w '%{http_code} %{time_total}\n' "${urls[@]}" >"$out.raw" ||
        die "curl $url failed"
    end=$(date +%s%N)
    awk '$1 != 200 { bad++ } END { print bad + 0 }' "$out.raw" >"$out.bad"
    awk '{ printf "%d\n", $2 * 1e6 }' "$out.raw" | sort -n | awk -v d=$(((end - start) / 1000)) -v bad="$(cat "$out.bad")" '
        { t[NR] = $1 }
        END {
            printf "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d socket_errors=0 status_errors=%d\n",
                NR, d, t[int(NR * 0.5 + 0.5)], t[int(NR * 0.99 + 0.5)], t[NR], bad
        }' >"$out"
}
CLOSE_REQUESTS="${BENCH_CLOSE_REQUESTS:-300}"

# resume NAME / pause NAME: the paused busy-polling haproxy runs only for
# its own row; other rows: nothing.
resume() { [[ $1 != haproxy-bp ]] || kill -CONT "$HAPROXY_BP_PID"; }
pause() { [[ $1 != haproxy-bp ]] || kill -STOP "$HAPROXY_BP_PID"; }

declare -A RPS P50 P99 ERRS OTHER CPU CPU1 HS P50R P99R CPUR
# measure NAME ROUND: the row's runs; results in the arrays above [NAME,ROUND].
measure() {
    resume "$1"
    measure_row "$@"
    pause "$1"
}
measure_row() {
    local name=$1 round=$2 tag="$1-r$2" url="http://127.0.0.1:${ROW_PORT[$1]}/"
    local -a hdr=() procs=()
    read -r -a procs <<<"${ROW_PROCS[$name]}"
    [[ -z "${ROW_HOST[$name]}" ]] || hdr=(-H "Host: ${ROW_HOST[$name]}")
    local body
    body=$(curl -fsS --max-time 2 "${hdr[@]}" "$url") || die "$name: GET $url failed"
    [[ "$body" == ok ]] || die "$name: GET $url answered '$body', expected 'ok'"
    local hs_before="" errs=0 sent=1 t0 t1 other_max=0 f req dur
    [[ "$name" != hop2-mtls ]] || hs_before=$(handshakes)
    if [[ -n "${ROW_CLOSE[$name]:-}" ]]; then
        curl_lat "$TMP/$tag-warmup.out" "$url" 20
    else
        run_wrk "$TMP/$tag-warmup.out" -t1 -c"$([[ ${ROW_KIND[$name]} == full ]] && echo "$CONNS" || echo 1)" -d"$WARMUP" \
            -s "$TMP/report.lua" "${hdr[@]}" "$url"
    fi
    sent=$((sent + $(field "$TMP/$tag-warmup.out" requests)))
    if [[ ${ROW_KIND[$name]} == full ]]; then
        log "$tag: throughput, -t1 -c$CONNS -d$DURATION"
        t0=$(ticks "${procs[@]}")
        cpu_mark
        run_wrk "$TMP/$tag-tput.out" -t1 -c"$CONNS" -d"$DURATION" -s "$TMP/report.lua" "${hdr[@]}" "$url"
        other_cpu_pct
        other_max=$OTHER_CPU
        t1=$(ticks "${procs[@]}")
        req=$(field "$TMP/$tag-tput.out" requests)
        dur=$(field "$TMP/$tag-tput.out" duration_us)
        sent=$((sent + req))
        RPS[$name,$round]=$(awk -v r="$req" -v d="$dur" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
        CPU[$name,$round]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v r="$req" 'BEGIN { printf "%.1f", t / hz * 1e6 / r }')
    fi
    log "$tag: latency, -t1 -c1 -d$DURATION"
    t0=$(ticks "${procs[@]}")
    cpu_mark
    if [[ -n "${ROW_CLOSE[$name]:-}" ]]; then
        curl_lat "$TMP/$tag-lat.out" "$url" "$CLOSE_REQUESTS"
    else
        run_wrk "$TMP/$tag-lat.out" -t1 -c1 -d"$DURATION" -s "$TMP/report.lua" "${hdr[@]}" "$url"
    fi
    other_cpu_pct
    ((OTHER_CPU <= other_max)) || other_max=$OTHER_CPU
    OTHER[$name,$round]=$other_max
    P50[$name,$round]=$(field "$TMP/$tag-lat.out" p50_us)
    P99[$name,$round]=$(field "$TMP/$tag-lat.out" p99_us)
    req=$(field "$TMP/$tag-lat.out" requests)
    sent=$((sent + req))
    # CPU per request at c=1: a proxy that polls instead of sleeping spends
    # its idle time between the requests here.
    CPU1[$name,$round]=n/a
    if [[ -n "${ROW_PROCS[$name]}" ]]; then
        CPU1[$name,$round]=$(awk -v t=$(($(ticks "${procs[@]}") - t0)) -v hz="$CLK_TCK" -v r="$req" 'BEGIN { printf "%.1f", t / hz * 1e6 / r }')
    fi
    P50R[$name,$round]=n/a P99R[$name,$round]=n/a CPUR[$name,$round]=n/a
    if [[ ${ROW_KIND[$name]} == full ]]; then
        # Open loop: a fixed rate whatever the answers take (no coordinated
        # omission), and the proxy's CPU per request at that rate, where
        # it idles between requests (what busy polling costs shows here).
        log "$tag: fixed rate, $RATE req/s, -t1 -c$LAT_CONNS -d$DURATION"
        t0=$(ticks "${procs[@]}")
        run_wrk "$TMP/$tag-rate.out" -t1 -c"$LAT_CONNS" -d"$DURATION" -s "$TMP/paced.lua" "${hdr[@]}" "$url" -- "$RATE"
        t1=$(ticks "${procs[@]}")
        req=$(field "$TMP/$tag-rate.out" requests)
        sent=$((sent + req))
        P50R[$name,$round]=$(field "$TMP/$tag-rate.out" p50_us)
        P99R[$name,$round]=$(field "$TMP/$tag-rate.out" p99_us)
        CPUR[$name,$round]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v r="$req" 'BEGIN { printf "%.1f", t / hz * 1e6 / r }')
        [[ -n "${ROW_PROCS[$name]}" ]] || CPUR[$name,$round]=n/a
    fi
    if [[ ${ROW_KIND[$name]} != full ]]; then
        RPS[$name,$round]=$(awk -v r="$(field "$TMP/$tag-lat.out" requests)" -v d="$(field "$TMP/$tag-lat.out" duration_us)" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
        CPU[$name,$round]=n/a
    fi
    for f in "$TMP/$tag"-*.out; do
        errs=$((errs + $(field "$f" socket_errors) + $(field "$f" status_errors)))
    done
    ERRS[$name,$round]=$errs
    HS[$name,$round]=n/a
    if [[ -n "$hs_before" ]]; then
        HS[$name,$round]=$(awk -v h=$(($(handshakes) - hs_before)) -v r="$sent" 'BEGIN { printf "%.3f", h / r * 1000 }')
    fi
    log "$tag: ${RPS[$name,$round]} req/s, p50 ${P50[$name,$round]} us, p99 ${P99[$name,$round]} us, CPU ${CPU[$name,$round]} us/req, $errs errors, other processes $other_max% CPU"
}

START=$SECONDS
for ((round = 1; round <= ROUNDS; round++)); do
    for name in "${ROWS[@]}"; do measure "$name" "$round"; done
done

# Idle CPU: what a proxy spends with no traffic at all, over IDLE_SECONDS
# after the runs (a poller that never sleeps shows here; one that polls
# only while something is awaited does not).
IDLE_SECONDS=3
declare -A IDLE_CPU
IDLE_ROWS=(nginx haproxy haproxy-bp sidecar busy-poll busy-poll-2ms)
for name in "${IDLE_ROWS[@]}"; do
    read -r -a procs <<<"${ROW_PROCS[$name]}"
    resume "$name"
    t0=$(ticks "${procs[@]}")
    sleep "$IDLE_SECONDS"
    t1=$(ticks "${procs[@]}")
    pause "$name"
    IDLE_CPU[$name]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v s="$IDLE_SECONDS" 'BEGIN { printf "%.0f", t / hz / s * 100 }')
    log "$name: ${IDLE_CPU[$name]}% of a core while idle"
done

# Paired throughput (see the header): ratios to the nginx run of each pair.
PAIRS="${BENCH_PAIRS:-8}"
PAIR_DURATION="${BENCH_PAIR_DURATION:-2s}"
POST_BYTES="${BENCH_POST_BYTES:-256}"
PAIRED=(sidecar policies ${BASELINE:+baseline})
POSTED=()
if ((POST_BYTES > 0)); then
    POSTED=(nginx-post sidecar-post ${BASELINE:+baseline-post})
    cat - "$TMP/report.lua" >"$TMP/post.lua" <<EOF
wrk.method = "POST"
wrk.body = string.rep("x", $POST_BYTES)
wrk.headers["Content-Type"] = "application/json"
EOF
fi
declare -A PAIR_RPS PAIR_CPU PAIR_USER
# pair_run NAME N: one throughput run of NAME for pair N (NAME-post: NAME's
# proxy answering POSTs). PAIR_USER is the user-space part of PAIR_CPU: the
# kernel's part (TCP on loopback, ~3/4 of it) moves with the VM's state from
# run to run, the proxy's own code much less.
# shellcheck disable=SC2034 # PAIR_*: read through `paired`'s nameref
pair_run() {
    local name=$1 n=$2 out="$TMP/pair-$1-$2.out" t0 t1 u0 u1 req dur row=${1%-post} script=report.lua
    [[ $name != *-post ]] || script=post.lua
    local -a procs=()
    read -r -a procs <<<"${ROW_PROCS[$row]}"
    t0=$(ticks "${procs[@]}")
    u0=$(ticks --user "${procs[@]}")
    run_wrk "$out" -t1 -c"$CONNS" -d"$PAIR_DURATION" -s "$TMP/$script" "http://127.0.0.1:${ROW_PORT[$row]}/"
    t1=$(ticks "${procs[@]}")
    u1=$(ticks --user "${procs[@]}")
    req=$(field "$out" requests)
    dur=$(field "$out" duration_us)
    PAIR_RPS[$name,$n]=$(awk -v r="$req" -v d="$dur" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
    PAIR_CPU[$name,$n]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v r="$req" 'BEGIN { printf "%.2f", t / hz * 1e6 / r }')
    PAIR_USER[$name,$n]=$(awk -v t=$((u1 - u0)) -v hz="$CLK_TCK" -v r="$req" 'BEGIN { printf "%.2f", t / hz * 1e6 / r }')
}
for ((n = 1; n <= PAIRS; n++)); do
    members=(nginx "${PAIRED[@]}" "${POSTED[@]}")
    shift_by=$((n % ${#members[@]}))
    order=("${members[@]:shift_by}" "${members[@]:0:shift_by}")
    log "pair $n: ${order[*]}, -t1 -c$CONNS -d$PAIR_DURATION each"
    for name in "${order[@]}"; do pair_run "$name" "$n"; done
done
# paired NAME ARRAY [REFERENCE]: "median [min-max]" of NAME's ratio to
# REFERENCE (default nginx) over the pairs.
paired() {
    local -n arr=$2
    local n reference=${3:-nginx}
    for ((n = 1; n <= PAIRS; n++)); do
        awk -v a="${arr[$1,$n]}" -v b="${arr[$reference,$n]}" 'BEGIN { if (b > 0) printf "%.4f\n", a / b }'
    done | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "n/a"; exit } m = (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2); printf "%.2f [%.2f-%.2f]", m, v[1], v[NR] }'
}
paired_median() { paired "$@" | cut -d' ' -f1; }

declare -A RSS_PEAK
for name in "${!SC_PID[@]}"; do
    kill -0 "${SC_PID[$name]}" 2>/dev/null || die "sidecar $name exited during the benchmark"
    RSS_PEAK[$name]=$(status_kb "${SC_PID[$name]}" VmHWM)
done
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

# Medians over the rounds (errors: sum; other CPU: max).
med_of() { # med_of ARRAY NAME
    local -n arr=$1
    local vals=() r
    for ((r = 1; r <= ROUNDS; r++)); do vals+=("${arr[$2,$r]}"); done
    local fmt="%.0f"
    case $1 in CPU | CPU1 | CPUR) fmt="%.1f" ;; HS) fmt="%.3f" ;; esac
    if [[ "${vals[0]}" == n/a ]]; then echo n/a; else printf '%s\n' "${vals[@]}" | sort -g | awk -v f="$fmt" '{ a[NR] = $1 } END { printf f "\n", (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; fi
}
for name in "${ROWS[@]}"; do
    for a in RPS P50 P99 CPU CPU1 HS P50R P99R CPUR; do
        printf -v "${a}[$name]" '%s' "$(med_of "$a" "$name")"
    done
    e=0 o=0
    for ((r = 1; r <= ROUNDS; r++)); do
        e=$((e + ERRS[$name,$r]))
        o=$((o > OTHER[$name,$r] ? o : OTHER[$name,$r]))
    done
    ERRS[$name]=$e OTHER[$name]=$o
done

# ----------------------------------------------------------------- report --
us() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.0f", a - b }'; }
rss_cell() { # rss_cell SIDECAR...: idle / peak MiB (the larger over the sidecars)
    local i=0 p=0 s
    for s in "$@"; do
        ((RSS_IDLE[$s] > i)) && i=${RSS_IDLE[$s]}
        ((RSS_PEAK[$s] > p)) && p=${RSS_PEAK[$s]}
    done
    echo "$(mib "$i") / $(mib "$p")"
}
declare -A RSS_OF=([sidecar]="sidecar" [baseline]="baseline" [policies]="policies" [busy-poll]="busy-poll" [busy-poll-2ms]="busy-poll-2ms" [nagle-sidecar]="nagle-sidecar"
    [nagle-baseline]="nagle-baseline" [hop2-plain]="plain-a plain-b" [hop2-mtls]="mtls-a mtls-b" [hop2-pol]="pol-a pol-b")
rows=("path|req/s|x direct|x nginx|p50 ms|p99 ms|added p50 us|added p99 us|CPU us/req|CPU us/req at c=1|added p50 / p99 us at $RATE/s|CPU us/req at $RATE/s|RSS MiB idle / load|TLS hs/1k req|errors")
for name in "${ROWS[@]}"; do
    case $name in
        nagle-*) base=nagle-direct peer=nagle-nginx ;;
        hop2-*) base=direct peer=hop2-nginx ;;
        *) base=direct peer=nginx ;;
    esac
    x_direct=$(ratio "${RPS[$name]}" "${RPS[direct]}")
    x_nginx=$(ratio "${RPS[$name]}" "${RPS[$peer]}")
    [[ $name != nagle-* ]] || x_direct=– x_nginx=–
    [[ $name != direct ]] || x_nginx=–
    add50=– add99=–
    if [[ $name != "$base" ]]; then
        add50=$(us "${P50[$name]}" "${P50[$base]}")
        add99=$(us "${P99[$name]}" "${P99[$base]}")
    fi
    at_rate=– cpu_rate=–
    if [[ ${P50R[$name]} != n/a && $name != "$base" && ${P50R[$base]:-n/a} != n/a ]]; then
        at_rate="$(us "${P50R[$name]}" "${P50R[$base]}") / $(us "${P99R[$name]}" "${P99R[$base]}")"
    fi
    [[ ${CPUR[$name]} == n/a ]] || cpu_rate=${CPUR[$name]}
    rss=–
    # shellcheck disable=SC2086 # a list of sidecar names
    [[ -z "${RSS_OF[$name]:-}" ]] || rss=$(rss_cell ${RSS_OF[$name]})
    cpu=${CPU[$name]}
    [[ $cpu != n/a && -n "${ROW_PROCS[$name]}" ]] || cpu=–
    hs=${HS[$name]}
    [[ $hs != n/a ]] || hs=–
    rps=${RPS[$name]}
    [[ $name != nagle-* ]] || rps="($rps)"
    cpu1=${CPU1[$name]}
    [[ $cpu1 != n/a ]] || cpu1=–
    rows+=("${LABEL[$name]}|$rps|$x_direct|$x_nginx|$(ms "${P50[$name]}")|$(ms "${P99[$name]}")|$add50|$add99|$cpu|$cpu1|$at_rate|$cpu_rate|$rss|$hs|${ERRS[$name]}")
done
table=$(printf '%s\n' "${rows[@]}" | md_table)

# The goals of issue 17 that this run measures.
ge() { awk -v a="$1" -v b="$2" 'BEGIN { print (a >= b) }'; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { print (a <= b) }'; }
mtls_rss=$(awk -v a="${RSS_PEAK[mtls-a]}" -v b="${RSS_PEAK[mtls-b]}" 'BEGIN { print (a > b ? a : b) }')
if ((PAIRS > 0)); then
    POST_PAIRED=""
    if ((POST_BYTES > 0)); then
        POST_PAIRED="; POST with a ${POST_BYTES}-byte body, against nginx's POST runs: $(paired sidecar-post PAIR_RPS nginx-post)x and $(paired sidecar-post PAIR_CPU nginx-post)x${BASELINE:+ (baseline build $(paired baseline-post PAIR_RPS nginx-post)x and $(paired baseline-post PAIR_CPU nginx-post)x)}"
    fi
    goal1="$(check "$(ge "$(paired_median policies PAIR_RPS)" 1)") (paired over $PAIRS pairs, median [range] of each run / its pair's nginx run: req/s $(paired policies PAIR_RPS)x, CPU per request $(paired policies PAIR_CPU)x (user space alone $(paired policies PAIR_USER)x); without policies $(paired sidecar PAIR_RPS)x and $(paired sidecar PAIR_CPU)x${BASELINE:+; baseline build $(paired baseline PAIR_RPS)x and $(paired baseline PAIR_CPU)x (user space $(paired baseline PAIR_USER)x)}${POST_PAIRED}. Medians of the rounds: $(ratio "${RPS[policies]}" "${RPS[nginx]}")x; two hops with policies $(ratio "${RPS[hop2-pol]}" "${RPS[hop2-nginx]}")x two nginx hops)"
else
    goal1="$(check "$(ge "${RPS[policies]}" "${RPS[nginx]}")") ($(ratio "${RPS[policies]}" "${RPS[nginx]}")x; without policies $(ratio "${RPS[sidecar]}" "${RPS[nginx]}")x; two hops with policies $(ratio "${RPS[hop2-pol]}" "${RPS[hop2-nginx]}")x two nginx hops)"
fi
# goal2 NAME: met / MISSED for goal 2 on row NAME, then its four added
# latencies as ratios of nginx's (c=1 p50 and p99, fixed-rate p50 and p99)
# and its CPU per request at the fixed rate, and idle when measured.
goal2() {
    local n=$1 ok=1 v
    local -a r=(
        "$(ratio "$((P50[$n] - P50[direct]))" "$((P50[nginx] - P50[direct]))")"
        "$(ratio "$((P99[$n] - P99[direct]))" "$((P99[nginx] - P99[direct]))")"
        "$(ratio "$((P50R[$n] - P50R[direct]))" "$((P50R[nginx] - P50R[direct]))")"
        "$(ratio "$((P99R[$n] - P99R[direct]))" "$((P99R[nginx] - P99R[direct]))")"
    )
    for v in "${r[@]}"; do [[ $v != n/a && $(le "$v" 0.8) == 1 ]] || ok=0; done
    echo "$(check "$ok") (c=1 ${r[0]}x / ${r[1]}x, at $RATE/s ${r[2]}x / ${r[3]}x; CPU ${CPUR[$n]} us/req at $RATE/s${IDLE_CPU[$n]:+, ${IDLE_CPU[$n]}% of a core idle})"
}
# hop2_latency NAME: two-hop row NAME's added latencies as ratios of two
# nginx hops' (c=1 p50 and p99, fixed-rate p50 and p99), and its CPU per
# request at the fixed rate.
hop2_latency() {
    local n=$1 base=hop2-nginx
    echo "$(ratio "$((P50[$n] - P50[direct]))" "$((P50[$base] - P50[direct]))")x / $(ratio "$((P99[$n] - P99[direct]))" "$((P99[$base] - P99[direct]))")x, $(ratio "$((P50R[$n] - P50R[direct]))" "$((P50R[$base] - P50R[direct]))")x / $(ratio "$((P99R[$n] - P99R[direct]))" "$((P99R[$base] - P99R[direct]))")x; ${CPUR[$n]} us/req"
}
goals=(
    "1. throughput >= 1.0x nginx (one hop, metrics + tracing + policies): $goal1"
    "2. added latency <= 0.8x nginx's, p50 and p99, at c=1 and at $RATE req/s: sidecar (default) $(goal2 sidecar); sidecar --busy-poll 200us $(goal2 busy-poll); sidecar --busy-poll 2ms (a window over the gap between requests at $RATE/s) $(goal2 busy-poll-2ms); for comparison haproxy with its own busy-polling $(goal2 haproxy-bp), nginx (CPU ${CPUR[nginx]} us/req at $RATE/s, ${IDLE_CPU[nginx]}% idle)"
    "3. Nagle app: added p50 within 1 ms of direct through the sidecar: $(check "$(le "$((${P50[nagle-sidecar]} - ${P50[nagle-direct]}))" 1000)") ($(ms "$((${P50[nagle-sidecar]} - ${P50[nagle-direct]}))") ms; nginx $(ms "$((${P50[nagle-nginx]} - ${P50[nagle-direct]}))") ms)"
    "4. two hops, mTLS: $(ratio "${RPS[hop2-mtls]}" "${RPS[hop2-nginx]}")x two nginx hops' throughput (plaintext $(ratio "${RPS[hop2-plain]}" "${RPS[hop2-nginx]}")x), ${HS[hop2-mtls]} TLS handshakes per 1000 requests; added latency against two nginx hops' (c=1 p50 / p99, at $RATE/s p50 / p99; CPU us/req at $RATE/s): mTLS $(hop2_latency hop2-mtls), --busy-poll 2ms on the inbound $(hop2_latency hop2-mtls-bpin), on both $(hop2_latency hop2-mtls-bp)"
    "5. RSS <= 15 MiB under load with mTLS on: $(check "$(le "$mtls_rss" $((15 * 1024)))") ($(mib "$mtls_rss") MiB peak, larger of A and B)"
)
other_line=$(other_cpu_line "${ROWS[@]}")
params="loopback, $(nproc) cores, $(uname -r); $([[ $PIN == 1 ]] && echo "clients and apps on core 0, proxies on core 1" || echo "not pinned"); throughput: wrk -t1 -c$CONNS -d$DURATION; latency: wrk -t1 -c1 -d$DURATION, and open loop at $RATE req/s (wrk -c$LAT_CONNS, paced); warm-up $WARMUP per row; $ROUNDS round(s), median shown; load average $LOAD_BEFORE before, $LOAD_AFTER after; runs took $((SECONDS - START))s; sidecar: $SIDECAR${BASELINE:+, baseline: $BASELINE}; $(tool_versions), $(haproxy -v | awk 'NR == 1 { print "HAProxy", $3 }')"

# The control plane at scale (another script's markdown fragment).
CP_SCALE=""
if [[ "${BENCH_CP_SCALE:-1}" == 1 && -f "$SCRIPT_DIR/control-plane-scale.sh" ]]; then
    log "control plane at scale: tests/bench/control-plane-scale.sh"
    CP_SCALE=$(BENCH_BIN_DIR="$BIN_DIR" bash "$SCRIPT_DIR/control-plane-scale.sh") ||
        CP_SCALE="control-plane-scale.sh failed (see its output above)"
fi

printf '\n%s\n\n' "$table"
printf '%s\n' "${goals[@]}"
printf '\n%s\n%s\n' "$other_line" "$params"
[[ -z "$CP_SCALE" ]] || printf '\n%s\n' "$CP_SCALE"

mkdir -p "$OUT_DIR"
{
    echo "# meshlet benchmark (issue 17)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) — $params"
    echo
    echo "$table"
    echo
    printf -- '- %s\n' "${goals[@]}"
    echo
    echo "$other_line"
    [[ -z "$CP_SCALE" ]] || printf '\n## Control plane at scale\n\n%s\n' "$CP_SCALE"
} >"$RESULTS"
log "written to $RESULTS"

# ------------------------------------------------------------------ chart --
# Three panels: throughput against nginx (same hops; the sidecar rows of
# one hop as paired medians when there were pairs, and the paired POST
# runs against nginx's POST runs), added latency at c=1,
# and the Nagle app's added p50.
{
    for name in haproxy sidecar policies baseline hop2-plain hop2-mtls; do
        [[ -n "${RPS[$name]:-}" ]] || continue
        case $name in hop2-*) peer=hop2-nginx ;; *) peer=nginx ;; esac
        if ((PAIRS > 0)) && [[ " ${PAIRED[*]} " == *" $name "* ]]; then
            printf '"%s (paired)" %s\n' "${LABEL[$name]}" "$(paired_median "$name" PAIR_RPS)"
        else
            printf '"%s" %s\n' "${LABEL[$name]}" "$(ratio "${RPS[$name]}" "${RPS[$peer]}")"
        fi
    done
    if ((PAIRS > 0)); then
        for name in "${POSTED[@]}"; do
            [[ $name != nginx-post ]] || continue
            printf '"%s, POST %s B (paired)" %s\n' "${LABEL[${name%-post}]}" "$POST_BYTES" \
                "$(paired_median "$name" PAIR_RPS nginx-post)"
        done
    fi
} >"$TMP/tput.dat"
{
    for name in nginx haproxy haproxy-bp sidecar baseline busy-poll busy-poll-2ms hop2-nginx hop2-plain hop2-mtls hop2-mtls-bpin hop2-mtls-bp; do
        [[ -n "${RPS[$name]:-}" ]] || continue
        printf '"%s" %s %s\n' "${LABEL[$name]}" $((P50[$name] - P50[direct])) $((P99[$name] - P99[direct]))
    done
} >"$TMP/lat.dat"
{
    for name in nagle-direct-ka nagle-sidecar nagle-baseline nagle-nginx; do
        [[ -n "${RPS[$name]:-}" ]] || continue
        printf '"%s" %s\n' "${LABEL[$name]#Nagle app: }" "$(ms "$((${P50[$name]} - ${P50[nagle-direct]}))")"
    done
} >"$TMP/nagle.dat"
gnuplot <<EOF || log "WARNING: gnuplot failed; no chart"
set terminal pngcairo size 1500,520 font "sans,10"
set output "$CHART"
set multiplot layout 1,3 title "meshlet benchmark, $(date -u '+%Y-%m-%d'), $(nproc) cores (clients + apps on core 0, proxy on core 1)"
set style data histograms
set style fill solid 0.8 border -1
set boxwidth 0.8
set grid ytics
set xtics rotate by -30 left noenhanced
set key noenhanced top left
set bmargin 9
set title "throughput, x nginx with the same hops (1.0 = nginx)"
set key top right
set yrange [0:1.3<*]
plot "$TMP/tput.dat" using 2:xtic(1) title "req/s / nginx's" lc rgb "#4477aa", \
    "" using 0:2:2 with labels offset 0,0.8 notitle, \
    1 with lines dt 2 lc rgb "black" title "nginx"
set title "added latency at c=1 vs direct (us, log scale)"
set logscale y
set yrange [10:*]
plot "$TMP/lat.dat" using 2:xtic(1) title "p50" lc rgb "#66ccee", "" using 3 title "p99" lc rgb "#ee6677"
unset logscale y
set title "Nagle app (python http.server): added p50 vs a new connection (ms)"
set yrange [0:60<*]
unset key
plot "$TMP/nagle.dat" using 2:xtic(1) lc rgb "#ccbb44", \
    "" using 0:2:2 with labels offset 0,0.8 notitle
unset multiplot
EOF
[[ -s "$CHART" ]] && log "chart: $CHART"
