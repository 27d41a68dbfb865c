# shellcheck shell=bash
# Shared helpers of the loopback benchmarks in this folder (run.sh: sidecar vs
# nginx; observability.sh: the cost of tracing; mtls.sh: two hops, plaintext
# vs mTLS; all.sh: every row of issue 17 in one run). Sourced, never run:
#
#   SCRIPT_DIR=...; ROOT=...; ROUNDS=...      # the caller's own settings
#   source "$SCRIPT_DIR/lib.sh"               # helpers + the cleanup trap
#   install_deps [COMMAND:PACKAGE...]         # wrk, nginx-light, curl (+ extras)
#   build_bins                                # release bins + the dist sidecar
#   make_tmp                                  # $TMP with the wrk Lua scripts
#
# Every process a script starts goes into PIDS (start_nginx and start_sidecar
# do it); the EXIT trap stops them all (TERM, then KILL after 5s), also the
# wrk run in progress, on success, failure and Ctrl-C alike,
# and removes $TMP (kept with BENCH_KEEP=1; on failure the tails of the logs
# in it are printed first).
#
# Settings shared by the scripts (each documents them in its header):
DURATION="${BENCH_DURATION:-10s}"
RATE="${BENCH_RATE:-1000}"
THREADS="${BENCH_THREADS:-1}"
CONNS="${BENCH_CONNS:-32}"
LAT_CONNS="${BENCH_LAT_CONNS:-16}"
WARMUP="${BENCH_WARMUP:-2s}"
OTHER_CPU_LIMIT="${BENCH_OTHER_CPU_LIMIT:-10}"
NGINX=/usr/sbin/nginx
# The command prefix wrk runs under (all.sh: `taskset -c 0`, the client's core).
CLIENT_PIN=()
# shellcheck disable=SC2034 # used by the scripts that source this file
OUT_DIR="${BENCH_OUT_DIR:-$ROOT/target/bench}"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- cleanup --
TMP=""
PIDS=()         # the services: upstreams, peers, sidecars, ...
WRK_PID=""      # the wrk run in progress, if any
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    [[ -z "$WRK_PID" ]] || PIDS+=("$WRK_PID")
    for pid in "${PIDS[@]}"; do
        # CONT: a process a script paused (SIGSTOP) acts on TERM only then.
        kill -TERM "$pid" 2>/dev/null || true
        kill -CONT "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Give each process a moment to exit, then force it.
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        if [[ $rc -ne 0 ]]; then
            for f in "$TMP"/*.log "$TMP"/*/error.log; do
                [[ -s "$f" ]] || continue
                log "---- last lines of $f"
                tail -n 20 "$f" >&2 || true
            done
        fi
        if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
            log "temp dir kept: $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ----------------------------------------------------- set-up steps --
# install_deps [COMMAND:PACKAGE...]: apt-get installs wrk, nginx-light and
# curl, plus each PACKAGE whose COMMAND is missing.
install_deps() {
    local need=() spec
    command -v wrk >/dev/null || need+=(wrk)
    [[ -x "$NGINX" ]] || need+=(nginx-light)
    command -v curl >/dev/null || need+=(curl)
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null || need+=("${spec#*:}")
    done
    if [[ ${#need[@]} -gt 0 ]]; then
        log "installing ${need[*]}"
        local sudo=()
        [[ $(id -u) -eq 0 ]] || sudo=(sudo)
        "${sudo[@]}" apt-get update -q
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
    fi
}

# The sidecar the benchmarks measure by default: the `dist` profile's build
# (Cargo.toml: release plus fat LTO, what the container images ship).
# shellcheck disable=SC2034 # used by the scripts that source this file
DIST_SIDECAR="$ROOT/target/dist/sidecar"

# build_bins: every binary with the release profile (control plane, meshctl,
# test helpers) and the sidecar with the dist profile (~3 min more).
build_bins() {
    log "cargo build --release --bins; cargo build --profile dist --bin sidecar"
    (cd "$ROOT" && cargo build --release --bins && cargo build --profile dist -p meshlet-sidecar --bin sidecar)
}

# need_sidecar PATH: dies with how to build it when PATH is not executable.
need_sidecar() {
    [[ -x "$1" ]] || die "$1 is not an executable (build it: cargo build --profile dist --bin sidecar)"
}

# make_tmp: the temp dir (configs, logs, wrk output) and the wrk Lua scripts.
make_tmp() {
    TMP="$(mktemp -d /tmp/meshlet-bench.XXXXXX)"
    chmod 755 "$TMP" # nginx workers drop root privileges and must reach it

    # The reporting and the paced (fixed-rate) Lua for wrk.
    cat >"$TMP/report.lua" <<'EOF'
-- Prints one machine-readable line; latency values are in microseconds.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d " ..
    "socket_errors=%d status_errors=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.timeout, e.status))
end
EOF
    cat "$TMP/report.lua" - >"$TMP/paced.lua" <<'EOF'
-- Fixed rate: each request (whichever connection sends it) takes the next slot
-- of one schedule, 1/rate apart, and waits for it. Run with -t1 (one schedule).
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval_ms, next_slot

function init(args)
  interval_ms = 1000 / tonumber(args[1])
end

function delay()
  local now = now_ms()
  if next_slot == nil then next_slot = now end
  local wait = next_slot - now
  next_slot = next_slot + interval_ms
  if wait < 0 then return 0 end
  return math.floor(wait + 0.5) -- wrk's timers have millisecond resolution
end
EOF
}

# -------------------------------------------------------------- services --
USED_PORTS=" "
# free_port VAR: a loopback port nobody listens on (below the ephemeral range,
# so wrk's and the proxies' own client sockets never take it).
free_port() {
    local p
    for _ in $(seq 500); do
        p=$((20000 + RANDOM % 12000))
        [[ "$USED_PORTS" == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+="$p "
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "no free loopback port found"
}

# wait_http URL PID NAME: poll URL until it answers 200 (deadline 20s).
wait_http() {
    local url=$1 pid=$2 name=$3 code
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || die "$name exited during start-up"
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
        [[ "$code" == 200 ]] && return 0
        sleep 0.1
    done
    die "$name not ready: $url answered '${code:-nothing}' for 20s"
}

# start_nginx NAME PORT SERVER_BLOCK [HTTP_EXTRA]: an nginx with its own prefix
# under $TMP, 1 worker, in the foreground of a background job. Sets NAME_PID.
start_nginx() {
    local name=$1 port=$2 server=$3 extra=${4:-}
    local dir="$TMP/$name"
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    # nginx closes a client keep-alive connection after 1000 requests by
    # default; the sidecar does not, so lift the limit for a like-for-like run.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
$extra
    server {
        listen 127.0.0.1:$port;
$server
    }
}
EOF
    "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" &
    local pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$port/" "$pid" "nginx ($name)"
    printf -v "${name^^}_PID" '%s' "$pid"
}

# start_nginx_proxy NAME PORT UPSTREAM_PORT: start_nginx as a reverse proxy
# to 127.0.0.1:UPSTREAM_PORT with an upstream keep-alive pool of 64 (HTTP/1.1
# to the upstream, as the sidecar). Sets NAME_PID.
start_nginx_proxy() {
    start_nginx "$1" "$2" '
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }' "
    upstream app {
        server 127.0.0.1:$3;
        keepalive 64;
        keepalive_requests 1000000;
    }"
}

# start_sidecar NAME BINARY APP_PORT INBOUND_PORT OUTBOUND_PORT ADMIN_PORT [ARGS...]:
# a sidecar (service `bench` unless ARGS has --service; standalone unless ARGS
# has --config or --control-plane) with its output in $TMP/NAME.log, waited
# for on /ready. Sets STARTED_PID.
start_sidecar() {
    local name=$1 bin=$2 app=$3 in=$4 out=$5 admin=$6
    shift 6
    local args=(--app-port "$app"
        --inbound-port "$in" --outbound-port "$out" --admin-port "$admin")
    [[ " $* " == *" --service "* ]] || args+=(--service bench)
    # The inbound listener binds 0.0.0.0 by default; keep the benchmark on loopback.
    if "$bin" --help 2>/dev/null | grep -q -- '--inbound-ip'; then
        args+=(--inbound-ip 127.0.0.1)
    fi
    "$bin" "${args[@]}" "$@" >"$TMP/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_http "http://127.0.0.1:$admin/ready" "$STARTED_PID" "$name"
}

# start_control_plane BINARY: a control plane on a free loopback port, its
# data dir $TMP/cp, output in $TMP/control-plane.log; waited for until its
# CA, admin token and /healthz are there (deadline 30s). Sets CP_PID, CP_URL,
# CP_DIR.
start_control_plane() {
    local bin=$1 port code=""
    free_port port
    CP_DIR="$TMP/cp"
    CP_URL="https://127.0.0.1:$port"
    "$bin" --listen "127.0.0.1:$port" --data-dir "$CP_DIR" >"$TMP/control-plane.log" 2>&1 &
    CP_PID=$!
    PIDS+=("$CP_PID")
    for _ in $(seq 300); do
        kill -0 "$CP_PID" 2>/dev/null || die "the control plane exited during start-up"
        if [[ -s "$CP_DIR/admin.token" && -s "$CP_DIR/ca.crt" ]]; then
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 --cacert "$CP_DIR/ca.crt" "$CP_URL/healthz" || true)
            [[ "$code" != 200 ]] || return 0
        fi
        sleep 0.1
    done
    die "the control plane is not ready on $CP_URL/healthz after 30s (answered '${code:-nothing}')"
}

# sidecar_token MESHCTL SERVICE: a sidecar token for SERVICE (namespace
# default) from the control plane above, in $TMP/SERVICE.token.
sidecar_token() {
    local meshctl=$1 s=$2
    MESHLET_SERVER="$CP_URL" MESHLET_TOKEN="$(cat "$CP_DIR/admin.token")" MESHLET_CA_FILE="$CP_DIR/ca.crt" \
        "$meshctl" token create --role sidecar --service "$s" --namespace default >"$TMP/$s.token" 2>"$TMP/meshctl-$s.log" ||
        die "meshctl token create --service $s failed: $(cat "$TMP/meshctl-$s.log")"
    [[ -s "$TMP/$s.token" ]] || die "meshctl token create --service $s printed no token"
}

# cp_flags SERVICE: the flags of a sidecar registered as SERVICE with the
# control plane above (one word per line: read them with mapfile).
cp_flags() {
    printf '%s\n' --service "$1" --control-plane "$CP_URL" --token-file "$TMP/$1.token" \
        --ca-file "$CP_DIR/ca.crt" --snapshot-file "$TMP/mtls-$1.snapshot.json"
}

# metric ADMIN_PORT NAME [LABEL]: NAME's value on that sidecar's /metrics,
# summed over the series (only those whose labels contain LABEL, e.g.
# direction="inbound"), or n/a when it has no such series.
metric() {
    { curl -s --max-time 2 "http://127.0.0.1:$1/metrics" 2>/dev/null || true; } |
        awk -v n="$2" -v l="${3:-}" '
            /^#/ { next }
            { name = $1; sub(/\{.*/, "", name) }
            name == n && index($1, l) { v += $NF; c++ }
            END { if (c) printf "%.0f\n", v; else print "n/a" }'
}

# ------------------------------------------------------------------- wrk --
# run_wrk OUTFILE ARGS...: runs wrk, keeps its output, checks the RESULT line.
run_wrk() {
    local out=$1
    shift
    # In the background so that a signal to this script is handled at once.
    "${CLIENT_PIN[@]}" wrk "$@" >"$out" 2>&1 &
    WRK_PID=$!
    local rc=0
    wait "$WRK_PID" || rc=$?
    WRK_PID=""
    ((rc == 0)) || { cat "$out" >&2; die "wrk $* failed"; }
    grep -q '^RESULT ' "$out" || { cat "$out" >&2; die "wrk $* printed no result"; }
}

# field FILE KEY: a value from wrk's RESULT line.
field() { sed -n "s/^RESULT .*\b$2=\([0-9]*\).*/\1/p" "$1"; }

# ------------------------------------------------------------ measuring --
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# Interference check. This machine has 2 cores and the load fills them, so any
# other busy process (a cargo build, say) skews the numbers. cpu_mark takes a
# snapshot: all CPU time spent (/proc/stat, softirq included: loopback traffic
# is processed there and charged to the process that caused it) minus the CPU
# time of this benchmark's processes (the services from /proc/PID/stat; wrk and
# the other tools through the `times` of this shell's reaped children).
# other_cpu_pct then gives what the rest of the machine used since the mark, in
# % of one core. Call both in this shell, not in $(...): `times` must see our
# children. Sets CPU_MARK_* / OTHER_CPU.
CLK_TCK=$(getconf CLK_TCK)
OUR_PIDS=()
cpu_mark() {
    local _c u n sy _i _w irq sirq st p f cu cs mins secs
    read -r _c u n sy _i _w irq sirq st _ </proc/stat
    CPU_MARK_ALL=$((u + n + sy + irq + sirq + st))
    CPU_MARK_OURS=0
    for p in "${OUR_PIDS[@]}"; do
        read -r -a f 2>/dev/null <"/proc/$p/stat" || continue # gone: skip it
        CPU_MARK_OURS=$((CPU_MARK_OURS + f[13] + f[14] + f[15] + f[16]))
    done
    times >"$TMP/times"
    { read -r _ _; read -r cu cs; } <"$TMP/times"
    for p in "$cu" "$cs"; do # e.g. 1m2.345s
        mins=${p%%m*}
        secs=${p#*m}
        secs=${secs%s}
        CPU_MARK_OURS=$((CPU_MARK_OURS + (mins * 60000 + 10#${secs%.*} * 1000 + 10#${secs#*.}) * CLK_TCK / 1000))
    done
    CPU_MARK_T=$(date +%s%N)
}
other_cpu_pct() {
    local all=$CPU_MARK_ALL ours=$CPU_MARK_OURS t=$CPU_MARK_T
    cpu_mark
    OTHER_CPU=$(awk -v a=$((CPU_MARK_ALL - all)) -v o=$((CPU_MARK_OURS - ours)) -v ns=$((CPU_MARK_T - t)) -v hz="$CLK_TCK" \
        'BEGIN { v = (a - o) / hz / (ns / 1e9) * 100; if (v < 0) v = 0; printf "%.0f", v }')
}

# collect_our_pids: every started process and its children (nginx workers)
# into OUR_PIDS, for cpu_mark. Call once all services run.
collect_our_pids() {
    local pid child
    for pid in "${PIDS[@]}"; do
        OUR_PIDS+=("$pid")
        for child in $(pgrep -P "$pid" || true); do OUR_PIDS+=("$child"); done # nginx workers
    done
}

# Per target and round: req/s, p50/p99 (us), errors, other CPU (%), requests sent.
declare -gA RPS P50 P99 ERRS OTHER REQS

# bench NAME PORT ROUND [HOST]: warm-up, throughput run, fixed-rate latency
# run, every request with `Host: HOST` if given (e.g. a mesh service name, for
# a sidecar's outbound listener). Results go to
# RPS/P50/P99/ERRS/OTHER/REQS[NAME,ROUND].
bench() {
    local name=$1 port=$2 round=$3 url="http://127.0.0.1:$2/" host=${4:-}
    local tag="$name-r$round"
    local body hdr=()
    [[ -z "$host" ]] || hdr=(-H "Host: $host")
    body=$(curl -fsS --max-time 2 "${hdr[@]}" "$url") || die "$name: GET $url${host:+ (Host: $host)} failed"
    [[ "$body" == ok ]] || die "$name: GET $url answered '$body', expected 'ok'"

    log "$tag: warm-up $WARMUP"
    run_wrk "$TMP/$tag-warmup.out" -t"$THREADS" -c"$CONNS" -d"$WARMUP" -s "$TMP/report.lua" "${hdr[@]}" "$url"

    log "$tag: throughput, -t$THREADS -c$CONNS -d$DURATION"
    cpu_mark
    run_wrk "$TMP/$tag-tput.out" -t"$THREADS" -c"$CONNS" -d"$DURATION" -s "$TMP/report.lua" "${hdr[@]}" "$url"
    other_cpu_pct
    local other_tput=$OTHER_CPU
    local req dur
    req=$(field "$TMP/$tag-tput.out" requests)
    dur=$(field "$TMP/$tag-tput.out" duration_us)
    RPS[$name,$round]=$(awk -v r="$req" -v d="$dur" 'BEGIN { printf "%.0f", r / (d / 1e6) }')

    log "$tag: latency at $RATE req/s, -t1 -c$LAT_CONNS -d$DURATION"
    cpu_mark
    run_wrk "$TMP/$tag-lat.out" -t1 -c"$LAT_CONNS" -d"$DURATION" -s "$TMP/paced.lua" "${hdr[@]}" "$url" -- "$RATE"
    other_cpu_pct
    OTHER[$name,$round]=$((other_tput > OTHER_CPU ? other_tput : OTHER_CPU))
    P50[$name,$round]=$(field "$TMP/$tag-lat.out" p50_us)
    P99[$name,$round]=$(field "$TMP/$tag-lat.out" p99_us)
    req=$(field "$TMP/$tag-lat.out" requests)
    dur=$(field "$TMP/$tag-lat.out" duration_us)
    local achieved
    achieved=$(awk -v r="$req" -v d="$dur" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
    if ((achieved < RATE * 95 / 100)); then
        log "WARNING: $tag latency run reached only $achieved of $RATE req/s"
    fi

    local errs=0 sent=1 f s st # sent: the curl check above, then wrk's runs
    for f in "$TMP/$tag-warmup.out" "$TMP/$tag-tput.out" "$TMP/$tag-lat.out"; do
        sent=$((sent + $(field "$f" requests)))
    done
    REQS[$name,$round]=$sent
    for f in "$TMP/$tag-tput.out" "$TMP/$tag-lat.out"; do
        s=$(field "$f" socket_errors)
        st=$(field "$f" status_errors)
        errs=$((errs + s + st))
    done
    ERRS[$name,$round]=$errs
    ((errs == 0)) || log "WARNING: $tag had $errs errors (see wrk output below)"
    ((errs == 0)) || cat "$TMP/$tag-tput.out" "$TMP/$tag-lat.out" >&2
    log "$tag: ${RPS[$name,$round]} req/s, p50 ${P50[$name,$round]} us, p99 ${P99[$name,$round]} us, $achieved req/s paced, $errs errors, other processes ${OTHER[$name,$round]}% CPU"
    if ((OTHER[$name,$round] > OTHER_CPU_LIMIT)); then
        log "WARNING: other processes used ${OTHER[$name,$round]}% of a core during $tag; its numbers are skewed"
    fi
}

# median VALUES...: the median (of an even count: the mean of the middle two).
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.0f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# summarize TARGET...: per target, the median over the ROUNDS rounds into
# RPS/P50/P99[TARGET]; errors and requests sent: the sum; other CPU: the max.
summarize() {
    local t round errs other sent
    local -a vals_rps vals_p50 vals_p99
    for t in "$@"; do
        vals_rps=() vals_p50=() vals_p99=() errs=0 other=0 sent=0
        for ((round = 1; round <= ROUNDS; round++)); do
            vals_rps+=("${RPS[$t,$round]}")
            vals_p50+=("${P50[$t,$round]}")
            vals_p99+=("${P99[$t,$round]}")
            errs=$((errs + ERRS[$t,$round]))
            other=$((other > OTHER[$t,$round] ? other : OTHER[$t,$round]))
            sent=$((sent + REQS[$t,$round]))
        done
        RPS[$t]=$(median "${vals_rps[@]}")
        P50[$t]=$(median "${vals_p50[@]}")
        P99[$t]=$(median "${vals_p99[@]}")
        ERRS[$t]=$errs
        OTHER[$t]=$other
        REQS[$t]=$sent
    done
}

# ----------------------------------------------------------------- report --
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
ms() { awk -v u="$1" 'BEGIN { printf "%.3f", u / 1000 }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", (a - b) / 1000 }'; }
check() { if [[ $1 == 1 ]]; then echo "met"; else echo "MISSED"; fi; }

# md_table < ROWS: '|'-separated rows (the first is the header) as an aligned
# markdown table: readable in a terminal and as markdown. The first column is
# left-aligned, the others right-aligned.
md_table() {
    awk -F'|' '
    { for (i = 1; i <= NF; i++) { cell[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) } n = NF }
    END {
        for (r = 1; r <= NR; r++) {
            line = "|"
            for (i = 1; i <= n; i++) line = line sprintf(" %" (i == 1 ? "-" : "") w[i] "s |", cell[r, i])
            print line
            if (r == 1) {
                line = "|"
                for (i = 1; i <= n; i++) { d = ""; for (k = 0; k < w[i]; k++) d = d "-"; line = line (i == 1 ? " " d " |" : " " substr(d, 2) ": |") }
                print line
            }
        }
    }'
}

# other_cpu_line TARGET...: the other processes' CPU per target (max over its
# runs), with a warning when any is over BENCH_OTHER_CPU_LIMIT.
other_cpu_line() {
    local t line="other processes' CPU during the runs (max, % of one core):" sep=" " over=0
    for t in "$@"; do
        line+="$sep$t ${OTHER[$t]}%"
        sep=", "
        ((OTHER[$t] <= OTHER_CPU_LIMIT)) || over=1
    done
    ((over == 0)) || line+=" -- over ${OTHER_CPU_LIMIT}%: the machine was not quiet, rerun for trustworthy numbers"
    echo "$line"
}

# tool_versions: wrk's and nginx's, for the parameters line.
tool_versions() { echo "$(wrk -v 2>&1 | head -n1 | awk '{print $1, $2}'), $("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"; }

# policies SERVICE: the four policies of all.sh's "+ policies" rows (goal 1
# of issue 17) for SERVICE, none of which refuses or retries anything during
# the runs; also profile.sh's `row-policies` scenario.
policies() {
    cat <<EOF
apiVersion: meshlet.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: $1-limit}
spec:
  targetRef: {service: $1}
  tokenBucket: {capacity: 1000000000, refillPerSecond: 1000000000}
  key: service
  scope: local
---
apiVersion: meshlet.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: $1-breaker}
spec:
  targetRef: {service: $1}
  consecutiveFailures: 5
  openDuration: 60s
---
apiVersion: meshlet.dev/v1alpha1
kind: RetryPolicy
metadata: {name: $1-retry}
spec:
  targetRef: {service: $1}
  attempts: 2
  retryOn: [gateway-error, connect-failure, reset]
---
apiVersion: meshlet.dev/v1alpha1
kind: TimeoutPolicy
metadata: {name: $1-timeout}
spec:
  targetRef: {service: $1}
  request: 10s
EOF
}
# ---------------------------------------------------- profiling scenarios --
# start_profile_upstream: the upstream of profile.sh and syscalls.sh, an nginx
# (1 worker) answering `200 ok` and swallowing spans at /v1/traces, on
# UP_PORT; and $TMP/policies.yaml, what their `policies` and `outbound`
# scenarios run with: the service `app` (that nginx) under a breaker, a
# retry and a timeout policy; a rate limit (too big to refuse) and tracing
# at 1.0 for the own service `bench`.
start_profile_upstream() {
    free_port UP_PORT
    log "upstream nginx on 127.0.0.1:$UP_PORT"
    start_nginx upstream "$UP_PORT" '
            default_type text/plain;
            location / { return 200 "ok\n"; }
            location = /v1/traces { return 200 ""; }'

    cat >"$TMP/policies.yaml" <<EOF
apiVersion: meshlet.dev/v1alpha1
kind: Service
metadata: {name: app}
spec:
  endpoints:
    - address: 127.0.0.1:$UP_PORT
---
apiVersion: meshlet.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: bench-limit}
spec:
  targetRef: {service: bench}
  tokenBucket: {capacity: 100000000, refillPerSecond: 100000000}
  key: service
  scope: local
---
apiVersion: meshlet.dev/v1alpha1
kind: TracingPolicy
metadata: {name: bench-tracing}
spec:
  targetRef: {service: bench}
  samplingRatio: 1.0
---
apiVersion: meshlet.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: app-breaker}
spec:
  targetRef: {service: app}
  consecutiveFailures: 5
  openDuration: 30s
---
apiVersion: meshlet.dev/v1alpha1
kind: RetryPolicy
metadata: {name: app-retry}
spec:
  targetRef: {service: app}
  attempts: 2
  retryOn: [gateway-error, connect-failure, reset]
---
apiVersion: meshlet.dev/v1alpha1
kind: TimeoutPolicy
metadata: {name: app-timeout}
spec:
  targetRef: {service: app}
  request: 5s
EOF
}

# scenario_flags SCENARIO: the extra sidecar flags of a profiling scenario
# (inbound, post: none; policies, outbound: the policies and the span sink;
# row-policies: all.sh's four policies of the one-hop "+ policies" row) into
# SCENARIO_FLAGS.
# shellcheck disable=SC2034 # used by the scripts that source this file
scenario_flags() {
    case "$1" in
        inbound | post) SCENARIO_FLAGS=() ;;
        policies | outbound)
            SCENARIO_FLAGS=(--config "$TMP/policies.yaml"
                --trace-endpoint "http://127.0.0.1:$UP_PORT/v1/traces")
            ;;
        row-policies)
            policies bench >"$TMP/row-policies.yaml"
            SCENARIO_FLAGS=(--config "$TMP/row-policies.yaml")
            ;;
        *) die "unknown scenario $1" ;;
    esac
}
