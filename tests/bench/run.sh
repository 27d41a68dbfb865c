#!/usr/bin/env bash
# meshlet sidecar benchmark (a script, not a timed test).
#
# What it measures, in one run, on loopback only (127.0.0.1):
#
#   direct   wrk -> upstream                      (baseline: the app alone)
#   sidecar  wrk -> sidecar inbound -> upstream   (target/release/sidecar)
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
# While the sidecar is under load its VmRSS is sampled from /proc/PID/status
# (peak of the samples), and VmHWM (the kernel's peak RSS) is read after.
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
#   BENCH_SIDECAR=PATH  the sidecar binary to measure (default target/release/sidecar),
#                       e.g. an older build, to compare two versions against nginx
#   BENCH_ROUNDS=1      repeat the three targets this many times, interleaved
#                       (direct, sidecar, nginx, direct, ...); the table shows
#                       each target's median over the rounds
#   BENCH_OTHER_CPU_LIMIT=10  warn when other processes use more than this %
#                       of a core during a run (see cpu_mark below)
#   BENCH_KEEP=1        keep the temp dir (configs, logs) after the run
# Output: the table on stdout and in target/bench/results.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

DURATION="${BENCH_DURATION:-10s}"
RATE="${BENCH_RATE:-1000}"
THREADS="${BENCH_THREADS:-1}"
CONNS="${BENCH_CONNS:-32}"
LAT_CONNS="${BENCH_LAT_CONNS:-16}"
WARMUP="${BENCH_WARMUP:-2s}"
ROUNDS="${BENCH_ROUNDS:-1}"
OTHER_CPU_LIMIT="${BENCH_OTHER_CPU_LIMIT:-10}"
NGINX=/usr/sbin/nginx
SIDECAR="${BENCH_SIDECAR:-$ROOT/target/release/sidecar}"
OUT_DIR="$ROOT/target/bench"
RESULTS="$OUT_DIR/results.md"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- cleanup --
TMP=""
PIDS=()         # the services: upstream, peer, sidecar
WRK_PID=""      # the wrk run in progress, if any
SAMPLER_PID=""  # the RSS sampler, while it runs
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    [[ -z "$WRK_PID" ]] || PIDS+=("$WRK_PID")
    [[ -z "$SAMPLER_PID" ]] || PIDS+=("$SAMPLER_PID")
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
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

# ----------------------------------------------------------- dependencies --
need=()
command -v wrk >/dev/null || need+=(wrk)
[[ -x "$NGINX" ]] || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
if [[ ${#need[@]} -gt 0 ]]; then
    log "installing ${need[*]}"
    SUDO=()
    [[ $(id -u) -eq 0 ]] || SUDO=(sudo)
    "${SUDO[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# ------------------------------------------------------------------ build --
log "cargo build --release --bins"
(cd "$ROOT" && cargo build --release --bins)
[[ -x "$SIDECAR" ]] || die "$SIDECAR was not built"

TMP="$(mktemp -d /tmp/meshlet-bench.XXXXXX)"
chmod 755 "$TMP" # nginx workers drop root privileges and must reach it

# --------------------------------------------------------------- helpers --
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
# under $TMP, 1 worker, in the foreground of a background job.
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

# The paced (fixed-rate) and reporting Lua for wrk.
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

# run_wrk OUTFILE ARGS...: runs wrk, keeps its output, checks the RESULT line.
run_wrk() {
    local out=$1
    shift
    # In the background so that a signal to this script is handled at once.
    wrk "$@" >"$out" 2>&1 &
    WRK_PID=$!
    local rc=0
    wait "$WRK_PID" || rc=$?
    WRK_PID=""
    ((rc == 0)) || { cat "$out" >&2; die "wrk $* failed"; }
    grep -q '^RESULT ' "$out" || { cat "$out" >&2; die "wrk $* printed no result"; }
}

# field FILE KEY: a value from wrk's RESULT line.
field() { sed -n "s/^RESULT .*\b$2=\([0-9]*\).*/\1/p" "$1"; }

# RSS sampler: VmRSS of PID every 0.2s while it runs, peak (kB) kept in FILE.
sample_rss() {
    local pid=$1 file=$2 peak=0 key val _
    while kill -0 "$pid" 2>/dev/null; do
        while read -r key val _; do
            if [[ $key == VmRSS: ]]; then
                if ((val > peak)); then peak=$val; echo "$peak" >"$file"; fi
                break
            fi
        done <"/proc/$pid/status" 2>/dev/null || true
        sleep 0.2
    done
}
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
    for p in "${OUR_PIDS[@]}" ${SAMPLER_PID:+"$SAMPLER_PID"}; do
        read -r -a f <"/proc/$p/stat" 2>/dev/null || continue
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

declare -A RPS P50 P99 ERRS OTHER
TARGETS=(direct sidecar nginx)
declare -A LABEL=(
    [direct]="direct (upstream)"
    [sidecar]="sidecar (inbound->app)"
    [nginx]="nginx peer (1 worker)"
)

# bench NAME PORT ROUND: warm-up, throughput run, fixed-rate latency run.
# Results go to RPS/P50/P99/ERRS[NAME,ROUND].
bench() {
    local name=$1 port=$2 round=$3 url="http://127.0.0.1:$2/"
    local tag="$name-r$round"
    local body
    body=$(curl -fsS --max-time 2 "$url") || die "$name: GET $url failed"
    [[ "$body" == ok ]] || die "$name: GET $url answered '$body', expected 'ok'"

    log "$tag: warm-up $WARMUP"
    run_wrk "$TMP/$tag-warmup.out" -t"$THREADS" -c"$CONNS" -d"$WARMUP" -s "$TMP/report.lua" "$url"

    log "$tag: throughput, -t$THREADS -c$CONNS -d$DURATION"
    cpu_mark
    run_wrk "$TMP/$tag-tput.out" -t"$THREADS" -c"$CONNS" -d"$DURATION" -s "$TMP/report.lua" "$url"
    other_cpu_pct
    local other_tput=$OTHER_CPU
    local req dur
    req=$(field "$TMP/$tag-tput.out" requests)
    dur=$(field "$TMP/$tag-tput.out" duration_us)
    RPS[$name,$round]=$(awk -v r="$req" -v d="$dur" 'BEGIN { printf "%.0f", r / (d / 1e6) }')

    log "$tag: latency at $RATE req/s, -t1 -c$LAT_CONNS -d$DURATION"
    cpu_mark
    run_wrk "$TMP/$tag-lat.out" -t1 -c"$LAT_CONNS" -d"$DURATION" -s "$TMP/paced.lua" "$url" -- "$RATE"
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

    local errs=0 f s st
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
start_nginx peer "$PEER_PORT" '
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }' "
    upstream app {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }"

log "sidecar: inbound 127.0.0.1:$IN_PORT -> app $UP_PORT, admin $ADMIN_PORT"
SIDECAR_ARGS=(--service bench --app-port "$UP_PORT"
    --inbound-port "$IN_PORT" --outbound-port "$OUT_PORT" --admin-port "$ADMIN_PORT")
# The inbound listener binds 0.0.0.0 by default; keep this benchmark on loopback.
if "$SIDECAR" --help 2>/dev/null | grep -q -- '--inbound-ip'; then
    SIDECAR_ARGS+=(--inbound-ip 127.0.0.1)
fi
"$SIDECAR" "${SIDECAR_ARGS[@]}" >"$TMP/sidecar.log" 2>&1 &
SIDECAR_PID=$!
PIDS+=("$SIDECAR_PID")
wait_http "http://127.0.0.1:$ADMIN_PORT/ready" "$SIDECAR_PID" sidecar
SIDECAR_RSS_IDLE=$(status_kb "$SIDECAR_PID" VmRSS)
for pid in "${PIDS[@]}"; do
    OUR_PIDS+=("$pid")
    for child in $(pgrep -P "$pid" || true); do OUR_PIDS+=("$child"); done # nginx workers
done

# -------------------------------------------------------------- the runs --
# Only informative: the load average still counts the build above and earlier
# runs; each run measures the other processes' CPU itself (cpu_mark).
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)

# The sidecar's VmRSS is sampled for the whole of the runs (it idles while the
# other targets run, so the peak is its peak under its own load).
sample_rss "$SIDECAR_PID" "$TMP/sidecar-rss-peak" &
SAMPLER_PID=$!

declare -A PORT=([direct]=$UP_PORT [sidecar]=$IN_PORT [nginx]=$PEER_PORT)
for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${TARGETS[@]}"; do
        bench "$t" "${PORT[$t]}" "$round"
    done
done

kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=""
kill -0 "$SIDECAR_PID" 2>/dev/null || die "sidecar exited during the benchmark"
SIDECAR_RSS_PEAK=$(cat "$TMP/sidecar-rss-peak" 2>/dev/null || echo 0)
SIDECAR_RSS_AFTER=$(status_kb "$SIDECAR_PID" VmRSS)
SIDECAR_HWM=$(status_kb "$SIDECAR_PID" VmHWM)
PEER_WORKER=$(ps --ppid "$PEER_PID" -o pid= | head -n1 | tr -d ' ')
PEER_HWM=$([[ -n "$PEER_WORKER" ]] && status_kb "$PEER_WORKER" VmHWM || echo 0)
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

# Per target: the median over the rounds (errors: the sum).
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.0f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
for t in "${TARGETS[@]}"; do
    vals_rps=() vals_p50=() vals_p99=() errs=0 other=0
    for ((round = 1; round <= ROUNDS; round++)); do
        vals_rps+=("${RPS[$t,$round]}")
        vals_p50+=("${P50[$t,$round]}")
        vals_p99+=("${P99[$t,$round]}")
        errs=$((errs + ERRS[$t,$round]))
        other=$((other > OTHER[$t,$round] ? other : OTHER[$t,$round]))
    done
    RPS[$t]=$(median "${vals_rps[@]}")
    P50[$t]=$(median "${vals_p50[@]}")
    P99[$t]=$(median "${vals_p99[@]}")
    ERRS[$t]=$errs
    OTHER[$t]=$other
done

# ----------------------------------------------------------------- report --
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
ms() { awk -v u="$1" 'BEGIN { printf "%.3f", u / 1000 }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", (a - b) / 1000 }'; }

rows=()
rows+=("target|req/s|ratio to direct|ratio to nginx|p50 ms|p99 ms|added p50 vs direct|added p99 vs direct|errors")
for t in "${TARGETS[@]}"; do
    rows+=("${LABEL[$t]}|${RPS[$t]}|$(ratio "${RPS[$t]}" "${RPS[direct]}")|$(ratio "${RPS[$t]}" "${RPS[nginx]}")|$(ms "${P50[$t]}")|$(ms "${P99[$t]}")|$(added "${P50[$t]}" "${P50[direct]}")|$(added "${P99[$t]}" "${P99[direct]}")|${ERRS[$t]}")
done

# An aligned markdown table: readable in a terminal and as markdown.
table=$(printf '%s\n' "${rows[@]}" | awk -F'|' '
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
    }')

rss_line="sidecar RSS: peak VmRSS sampled under load $(mib "$SIDECAR_RSS_PEAK") MiB, VmHWM $(mib "$SIDECAR_HWM") MiB (idle before load $(mib "$SIDECAR_RSS_IDLE") MiB, after load $(mib "$SIDECAR_RSS_AFTER") MiB); nginx peer worker VmHWM $(mib "$PEER_HWM") MiB"

check() { if [[ $1 == 1 ]]; then echo "met"; else echo "MISSED"; fi; }
c_tput=$(awk -v s="${RPS[sidecar]}" -v n="${RPS[nginx]}" 'BEGIN { print (s >= n) }')
c_p50=$(awk -v s="${P50[sidecar]}" -v n="${P50[nginx]}" 'BEGIN { print (s <= n) }')
c_p99=$(awk -v s="${P99[sidecar]}" -v n="${P99[nginx]}" 'BEGIN { print (s <= n) }')
c_rss=$(awk -v h="$SIDECAR_HWM" -v p="$SIDECAR_RSS_PEAK" 'BEGIN { m = (h > p ? h : p); print (m <= 20 * 1024) }')
other_line="other processes' CPU during the runs (max, % of one core): direct ${OTHER[direct]}%, sidecar ${OTHER[sidecar]}%, nginx ${OTHER[nginx]}%"
if ((OTHER[direct] > OTHER_CPU_LIMIT || OTHER[sidecar] > OTHER_CPU_LIMIT || OTHER[nginx] > OTHER_CPU_LIMIT)); then
    other_line+=" -- over ${OTHER_CPU_LIMIT}%: the machine was not quiet, rerun for trustworthy numbers"
fi
targets="targets: sidecar req/s >= nginx: $(check "$c_tput"); added p50 <= nginx's: $(check "$c_p50"); added p99 <= nginx's: $(check "$c_p99"); RSS <= 20 MiB: $(check "$c_rss")"

params="loopback, $(nproc) cores, $(uname -r); throughput: wrk -t$THREADS -c$CONNS -d$DURATION; latency: $RATE req/s fixed rate, -t1 -c$LAT_CONNS -d$DURATION; warm-up $WARMUP per target; $ROUNDS round(s), median shown; load average $LOAD_BEFORE before, $LOAD_AFTER after; $(wrk -v 2>&1 | head -n1 | awk '{print $1, $2}'), $("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"

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
