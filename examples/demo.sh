#!/usr/bin/env bash
# meshlet local demo: a control plane and three services with sidecars on
# 127.0.0.1, every instance registered and every sidecar fed by the control
# plane's push.
#
#   control plane  :18010  (HTTPS API, watch stream; data in the log directory)
#   frontend    app :18080  sidecar in :18006 out :18001 admin :18020
#   orders v1   app :18081  sidecar in :18106 out :18101 admin :18120
#   orders v2   app :18082  sidecar in :18206 out :18201 admin :18220
#   inventory   app :18083  sidecar in :18306 out :18301 admin :18320
#   edge (gateway, no app)  sidecar in :18090 out :18092 admin :18091
#
# `curl http://127.0.0.1:18006/work` enters frontend through its sidecar;
# frontend calls orders, orders calls inventory, each call through the
# caller's outbound sidecar (HTTP_PROXY) to a registered instance's inbound
# sidecar. The control plane serves HTTPS with its own CA and wants a token:
# meshctl uses the admin token and CA it wrote on first start
# (DATA_DIR/admin.token, DATA_DIR/ca.crt), each sidecar a token of its own
# service made with `meshctl token create --role sidecar`. The tour then
# shows meshctl (tokens too), broadcast, an instance failing its health
# check, an instance killed with SIGKILL, a control plane restart, and
# policies (traffic split, rate limit, circuit breaker, rollback), then
# the ingress gateway `edge` with Routes (host and path routing, a canary by
# header, a mirrored copy, no_route), a fault-injected delay shown in a
# trace and a dry-run rate limit, with traffic checked at every step.
#
# Usage: examples/demo.sh [--keep-running] [--rounds N]
#   --keep-running  after the tour, keep sending traffic until Ctrl-C
#   --rounds N      requests per traffic phase (default 12)
#
# Needs only Rust (cargo), curl and jq; curl and jq are installed with
# apt-get if missing. Every process logs to a temporary directory that is
# printed at the end.
set -euo pipefail

ROUNDS=12
KEEP_RUNNING=0
READY_TIMEOUT=${DEMO_READY_TIMEOUT:-30} # seconds
TTL=5s                                  # instance expiry (the default is 10s)

usage() { sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case "$1" in
    --keep-running) KEEP_RUNNING=1 ;;
    --rounds)
      [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || { echo "--rounds needs a positive number" >&2; exit 2; }
      ROUNDS=$2
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CP_PORT=18010
# meshctl's settings; MESHLET_TOKEN and MESHLET_CA_FILE are set once the
# control plane has written them (start_control_plane).
export MESHLET_SERVER=https://127.0.0.1:$CP_PORT
unset MESHLET_TOKEN MESHLET_TOKEN_FILE MESHLET_CA_FILE MESHLET_CONTROL_PLANE
# name → "app inbound outbound admin version calls"
declare -A INSTANCE=(
  [frontend]="18080 18006 18001 18020 v1 orders"
  [orders-v1]="18081 18106 18101 18120 v1 inventory"
  [orders-v2]="18082 18206 18201 18220 v2 inventory"
  [inventory]="18083 18306 18301 18320 v1 -"
)
INSTANCES=(inventory orders-v1 orders-v2 frontend)
# The ingress gateway `edge` (sidecar --mode gateway, no app).
GW_IN=18090 GW_OUT=18092 GW_ADMIN=18091

if [[ -t 1 ]]; then BOLD=$'\e[1m' DIM=$'\e[2m' RED=$'\e[31m' GREEN=$'\e[32m' RESET=$'\e[0m'
else BOLD='' DIM='' RED='' GREEN='' RESET=''; fi
section() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$RESET"; }
info() { printf '   %s\n' "$*"; }
ok() { printf '   %sok%s   %s\n' "$GREEN" "$RESET" "$*"; }
FAILURES=0
bad() { printf '   %sFAIL%s %s\n' "$RED" "$RESET" "$*"; FAILURES=$((FAILURES + 1)); }
die() { printf '%serror:%s %s\n' "$RED" "$RESET" "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
section "Prerequisites"
missing=()
for tool in curl jq; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if ((${#missing[@]})); then
  info "${missing[*]} missing; installing with apt-get"
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "${missing[*]} missing and neither root nor sudo is available"
    SUDO=(sudo)
  fi
  "${SUDO[@]}" apt-get update
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" ca-certificates
fi
if ! command -v cargo >/dev/null 2>&1 && [[ -f $HOME/.cargo/env ]]; then
  # shellcheck disable=SC1091
  source "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust from https://rustup.rs"
info "curl: $(command -v curl), jq: $(command -v jq), cargo: $(command -v cargo)"

# All demo traffic goes to 127.0.0.1 directly: a proxy from the user's
# environment must not capture it (the apps get their own HTTP_PROXY).
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY

section "Building (cargo build --release --bins)"
cargo build --release --bins
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
BIN=$TARGET_DIR/release
for exe in sidecar control-plane meshctl demo-service; do
  [[ -x $BIN/$exe ]] || die "$BIN/$exe was not built"
done
meshctl() { "$BIN/meshctl" "$@"; }

# ---------------------------------------------------------------- processes
LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/meshlet-demo.XXXXXX")
WORK=$LOG_DIR/.http # scratch files for responses
mkdir -p "$WORK"
DATA_DIR=$LOG_DIR/data                # the control plane's: admin.token, ca.crt, the store
TOKENS=$LOG_DIR/tokens                # one sidecar token file per service (0600)
CA_FILE=$DATA_DIR/ca.crt
AUTH_HEADER=$WORK/authorization       # curl -H @FILE: the admin token stays off command lines
declare -A PID_OF=()

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local name pids=()
  for name in "${!PID_OF[@]}"; do pids+=("${PID_OF[$name]}"); done
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + 5))
    while ((SECONDS < deadline)) && kill -0 "${pids[@]}" 2>/dev/null; do sleep 0.1; done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  printf '\nStopped the demo processes. Logs: %s\n' "$LOG_DIR"
  exit "$status"
}
on_signal() {
  printf '\nInterrupted.\n'
  # Ctrl-C is the normal way to end --keep-running.
  if ((KEEP_RUNNING && IN_KEEP_RUNNING)); then exit 0; else exit "$1"; fi
}
IN_KEEP_RUNNING=0
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start NAME COMMAND...: run in the background, logging to $LOG_DIR/NAME.log,
# without meshctl's admin token in its environment.
start() {
  local name=$1
  shift
  env -u MESHLET_TOKEN -u MESHLET_SERVER "$@" >>"$LOG_DIR/$name.log" 2>&1 &
  PID_OF[$name]=$!
  info "started $name (pid $!)"
}

# stop NAME [SIGNAL]
stop() {
  local name=$1 signal=${2:-TERM} pid=${PID_OF[$1]}
  kill "-$signal" "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "PID_OF[$name]"
  info "stopped $name (pid $pid) with SIG$signal"
}

# wait_for NAME URL [CURL_ARGS...]: poll until URL answers 200, NAME exits,
# or the deadline passes.
wait_for() {
  local name=$1 url=$2 deadline=$((SECONDS + READY_TIMEOUT))
  shift 2
  until curl -fsS -o /dev/null --max-time 1 "$@" "$url" 2>/dev/null; do
    if ! kill -0 "${PID_OF[$name]}" 2>/dev/null; then
      tail -n 20 "$LOG_DIR/$name.log" >&2 || true
      die "$name exited before it was ready (log: $LOG_DIR/$name.log)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 20 "$LOG_DIR/$name.log" >&2 || true
      die "$name not ready after ${READY_TIMEOUT}s: $url (log: $LOG_DIR/$name.log)"
    fi
    sleep 0.1
  done
  ok "$name ready ($url)"
}

# wait_until DESCRIPTION SECONDS COMMAND...: poll COMMAND until it succeeds.
wait_until() {
  local what=$1 patience=$2 started=$SECONDS
  shift 2
  local deadline=$((SECONDS + patience))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then bad "$what: not within ${patience}s"; return 1; fi
    sleep 0.1
  done
  ok "$what (after ~$((SECONDS - started))s)"
}

# start_control_plane: start it, wait for /healthz over HTTPS (verified with
# the CA it writes on first start), then point meshctl at it with the admin
# token and CA from its data directory (a restart keeps both).
start_control_plane() {
  start control-plane env NO_COLOR=1 "$BIN/control-plane" --listen "127.0.0.1:$CP_PORT" \
    --data-dir "$DATA_DIR" --ttl "$TTL"
  wait_for control-plane "$MESHLET_SERVER/healthz" --cacert "$CA_FILE"
  [[ -s $DATA_DIR/admin.token ]] || die "the control plane wrote no $DATA_DIR/admin.token"
  MESHLET_TOKEN=$(tr -d '\n' <"$DATA_DIR/admin.token")
  export MESHLET_TOKEN MESHLET_CA_FILE=$CA_FILE
  (umask 077 && printf 'Authorization: Bearer %s\n' "$MESHLET_TOKEN" >"$AUTH_HEADER")
}

# cp_curl ARGS...: curl to the control plane's API with the CA and admin token.
cp_curl() { curl --cacert "$CA_FILE" -H "@$AUTH_HEADER" "$@"; }

# sidecar_tokens SERVICE...: a sidecar token per service, bound to it, in
# $TOKENS/SERVICE.token (0600), made with meshctl token create.
sidecar_tokens() {
  local service
  (umask 077 && mkdir -p "$TOKENS")
  for service in "$@"; do
    (umask 077 && meshctl token create --role sidecar --service "$service" >"$TOKENS/$service.token") ||
      die "meshctl token create --role sidecar --service $service failed"
    info "sidecar token for $service in $TOKENS/$service.token"
  done
}

# start_instance NAME: the app and its sidecar, registered with the control plane.
start_instance() {
  local name=$1 service=${1%-v*}
  read -r app in out admin version calls <<<"${INSTANCE[$name]}"
  local call_args=()
  [[ $calls != - ]] && call_args=(--calls "$calls")
  start "$name-app" env HTTP_PROXY="http://127.0.0.1:$out" \
    "$BIN/demo-service" --name "$service" --port "$app" --version "$version" "${call_args[@]}"
  # NO_COLOR keeps the log files free of terminal escapes.
  start "$name-sidecar" env NO_COLOR=1 "$BIN/sidecar" --service "$service" --app-port "$app" \
    --inbound-ip 127.0.0.1 --inbound-port "$in" --outbound-port "$out" --admin-port "$admin" \
    --labels "version=$version" --control-plane "$MESHLET_SERVER" \
    --token-file "$TOKENS/$service.token" --ca-file "$CA_FILE" \
    --snapshot-file "$LOG_DIR/$name.snapshot.json"
}

wait_instance() {
  local name=$1
  read -r app _ _ admin _ _ <<<"${INSTANCE[$name]}"
  wait_for "$name-app" "http://127.0.0.1:$app/health"
  wait_for "$name-sidecar" "http://127.0.0.1:$admin/ready"
}

# ---------------------------------------------------------------- helpers
# request ARGS...: run curl; sets CODE, BODY, REASON (x-meshlet-reason), TIME_MS.
request() {
  local out
  : >"$WORK/headers"
  : >"$WORK/body"
  out=$(curl -sS --max-time 10 -D "$WORK/headers" -o "$WORK/body" -w '%{http_code} %{time_total}' "$@" 2>"$WORK/err") || true
  CODE=${out%% *}
  TIME_MS=$(awk -v t="${out##* }" 'BEGIN { printf "%.0f", t * 1000 }')
  BODY=$(cat "$WORK/body")
  [[ -s $WORK/err ]] && BODY="$(tr -d '\r\n' <"$WORK/err") $BODY"
  REASON=$(grep -i '^x-meshlet-reason:' "$WORK/headers" | head -n 1 | cut -d: -f2- | tr -d ' \r') || true
}

declare -A ANSWERED=()
ROUND_OK=0
# one_round N: one request through frontend's sidecar, one summary line.
one_round() {
  local n=$1 trace_id span_id chain kept
  trace_id=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  span_id=$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')
  request -H "traceparent: 00-$trace_id-$span_id-01" "http://127.0.0.1:18006/work"
  LAST_TRACE=$trace_id
  # frontend's answer nests orders' answer, which nests inventory's.
  chain=$(jq -r '[.service + " " + .version,
                   (.calls[0].body | .service + " " + .version + " :" + (.port|tostring)),
                   (.calls[0].body.calls[0].body | .service + " " + .version)] | join(" -> ")' \
    <<<"$BODY" 2>/dev/null) || chain=""
  kept=$(jq -r --arg t "$trace_id" '.calls[0].body.calls[0].body.headers.traceparent // "" | if startswith("00-" + $t) then "kept" else "lost" end' <<<"$BODY" 2>/dev/null) || kept="?"
  if [[ $CODE == 200 && -n $chain ]]; then
    ROUND_OK=$((ROUND_OK + 1))
    local orders
    orders=$(jq -r '.calls[0].body | .version + " :" + (.port|tostring)' <<<"$BODY")
    ANSWERED[$orders]=$((${ANSWERED[$orders]:-0} + 1))
    printf '   %4s  %s  %-52s %-6s %5s ms\n' "$n" "$CODE" "$chain" "$kept" "$TIME_MS"
  else
    printf '   %4s  %s%s%s  %s\n' "$n" "$RED" "$CODE" "$RESET" "${REASON:+x-meshlet-reason=$REASON  }$(tr -d '\n' <<<"${BODY:0:200}")"
  fi
}

# traffic TITLE: ROUNDS requests; checks they all succeed; prints who answered.
traffic() {
  printf '\n   %s%s%s\n' "$BOLD" "$1" "$RESET"
  printf '   %s%4s  %s  %-52s %-6s %8s%s\n' "$DIM" '#' 'st.' 'frontend -> orders (instance) -> inventory' 'trace' 'time' "$RESET"
  ANSWERED=()
  ROUND_OK=0
  local i
  for ((i = 1; i <= ROUNDS; i++)); do one_round "$i"; done
  local who line=""
  for who in "${!ANSWERED[@]}"; do line+="  orders $who: ${ANSWERED[$who]}"; done
  info "answered by:${line:- nobody}"
  if ((ROUND_OK == ROUNDS)); then ok "all $ROUNDS requests succeeded"; else bad "$((ROUNDS - ROUND_OK)) of $ROUNDS requests failed"; fi
}

# run_shown COMMAND...: print and run a command, indented.
run_shown() {
  printf '\n   %s$ %s%s\n' "$BOLD" "$*" "$RESET"
  local status=0
  "$@" 2>&1 | sed 's/^/     /' || status=$?
  return "$status"
}

# trace_has_spans TRACE_ID N: the control plane holds N spans of the trace.
trace_has_spans() {
  cp_curl -fsS --max-time 2 "$MESHLET_SERVER/api/traces/$1" | jq -e --argjson n "$2" '.spans | length == $n'
}

# registered SERVICE ADDRESS HEALTHY: is ADDRESS registered with that health?
registered() {
  cp_curl -fsS --max-time 2 "$MESHLET_SERVER/api/v1/services/default/$1" |
    jq -e --arg a "$2" --argjson h "$3" '[.instances[] | select(.address == $a and .healthy == $h)] | length == 1'
}
# not_registered SERVICE ADDRESS
not_registered() {
  cp_curl -fsS --max-time 2 "$MESHLET_SERVER/api/v1/services/default/$1" |
    jq -e --arg a "$2" '[.instances[] | select(.address == $a)] | length == 0'
}
# routes_to ADMIN_PORT SERVICE N: the sidecar routes SERVICE to N healthy endpoints.
routes_to() {
  curl -fsS --max-time 2 "http://127.0.0.1:$1/config_dump" |
    jq -e --arg s "$2" --argjson n "$3" '[.snapshot.services[] | select(.name == $s) | .endpoints[]] | length == $n'
}

# ---------------------------------------------------------------- the tour
for port in $CP_PORT $GW_IN $GW_OUT $GW_ADMIN 18080 18081 18082 18083 18006 18001 18020 18106 18101 18120 18206 18201 18220 18306 18301 18320; do
  port_in_use "$port" && die "port $port on 127.0.0.1 is already in use (another demo still running?)"
done

section "Control plane (logs and data in $LOG_DIR)"
start_control_plane
info "HTTPS with its own CA ($CA_FILE); meshctl uses the admin token it wrote ($DATA_DIR/admin.token)"
run_shown meshctl apply -f examples/policies/health-checks.yaml || bad "meshctl apply failed"

section "Credentials: one sidecar token per service, each bound to its service"
sidecar_tokens frontend orders inventory
run_shown meshctl token list || bad "meshctl token list failed"

section "Three services, four instances, each with a sidecar registered with the control plane"
for name in "${INSTANCES[@]}"; do start_instance "$name"; done
for name in "${INSTANCES[@]}"; do wait_instance "$name"; done
wait_until "frontend's sidecar routes orders to both instances" 10 routes_to 18020 orders 2

section "What the control plane knows"
run_shown meshctl get services || bad "meshctl get services failed"
run_shown meshctl get endpoints orders || bad "meshctl get endpoints failed"

section "Traffic: curl http://127.0.0.1:18006/work"
info "client -> frontend sidecar -> frontend -> outbound sidecar -> orders sidecar (v1 or v2) -> orders"
info "       -> outbound sidecar -> inventory sidecar -> inventory   (each request carries a fresh traceparent)"
traffic "$ROUNDS requests"
# One request at a time leaves both instances idle, and the balancer breaks
# that tie with a coin flip: 12 in a row to one happens once in ~2000 runs.
# A few more requests settle it (40 in all: once in ~5e11).
for ((extra = ROUNDS + 1; ${#ANSWERED[@]} < 2 && extra <= 40; extra++)); do one_round "$extra"; done
((${#ANSWERED[@]} == 2)) && ok "load spread over both orders instances" || bad "expected both orders instances to answer"

section "Observability: each request above is one trace; every sidecar counts what it proxies"
info "the last request's trace, as the sidecars exported it (OTLP) to the control plane:"
wait_until "its 5 spans reached the control plane" 5 trace_has_spans "$LAST_TRACE" 5
run_shown meshctl trace "$LAST_TRACE" || bad "meshctl trace failed"
run_shown meshctl traces --service inventory --limit 3 || bad "meshctl traces failed"
printf '\n   %sfrontend sidecar /metrics (excerpt: request_total, histogram counts)%s\n' "$BOLD" "$RESET"
curl -fsS http://127.0.0.1:18020/metrics | grep -E '^(request_total|response_time_seconds_count)' | sed 's/^/     /' ||
  bad "frontend's sidecar /metrics has no request_total"

section "Broadcast: one message to every healthy instance, through its sidecar"
printf '{"event":"cache-flush","from":"demo"}' >"$WORK/msg.json"
run_shown meshctl broadcast --path /broadcast --data "@$WORK/msg.json" || bad "broadcast reported failures"

section "Health checking: orders v2 starts failing /health"
run_shown curl -sS -X POST http://127.0.0.1:18082/health/fail
wait_until "orders v2 marked unhealthy in the registry (2 failed probes, 1s apart)" 10 registered orders 127.0.0.1:18206 false
wait_until "frontend's sidecar stopped routing to it" 5 routes_to 18020 orders 1
traffic "$ROUNDS requests while orders v2 is unhealthy"
[[ -z ${ANSWERED["v2 :18082"]:-} ]] && ok "no request reached the unhealthy instance" || bad "the unhealthy instance got traffic"
run_shown curl -sS -X POST http://127.0.0.1:18082/health/pass
wait_until "orders v2 healthy again and routed to" 10 routes_to 18020 orders 2

section "Crash: orders v2's sidecar and app are killed with SIGKILL (no deregistration)"
stop orders-v2-sidecar KILL
stop orders-v2-app KILL
traffic "$ROUNDS requests right after the crash (a refused connection is retried on another instance)"
wait_until "the registry expired orders v2 (TTL $TTL)" 15 not_registered orders 127.0.0.1:18206
wait_until "frontend's sidecar routes orders to one instance" 5 routes_to 18020 orders 1

section "Control plane outage: killed with SIGKILL, sidecars keep routing"
stop control-plane KILL
traffic "$ROUNDS requests with the control plane down"
run_shown meshctl get services && bad "meshctl should fail with the control plane down" || ok "meshctl says why, in one line"
start_control_plane
run_shown meshctl get endpoints orders || bad "meshctl get endpoints failed after the restart"
info "the registry came back from $LOG_DIR/data; the instance restarts and registers again:"
start_instance orders-v2
wait_instance orders-v2
wait_until "frontend's sidecar routes orders to both instances again" 10 routes_to 18020 orders 2
traffic "$ROUNDS requests after the restart"

section "Policies: applied with meshctl, enforced by every sidecar within a second"
POLICIES=examples/policies/demo
REV_BEFORE_POLICIES=$(cp_curl -fsS "$MESHLET_SERVER/api/v1/revisions?limit=1" | jq '.[0].revision')
printf '\n   %s$ meshctl diff -f %s%s   (exit 1: something would change)\n' "$BOLD" "$POLICIES" "$RESET"
meshctl diff -f "$POLICIES" 2>&1 | sed 's/^/     /' || true
run_shown meshctl apply -f "$POLICIES" || bad "meshctl apply failed"
wait_until "frontend's sidecar has the traffic split" 5 \
  bash -c "curl -fsS http://127.0.0.1:18020/config_dump | grep -q orders-canary"
# Both subsets must have a healthy endpoint before counting: the split
# skips a subset without one (orders v2 was failed, killed and restarted
# above, and the registry came back from disk, so its health may lag).
wait_until "both of the split's subsets have a healthy endpoint" 10 \
  bash -c "curl -fsS http://127.0.0.1:18020/config_dump | jq -e '[.. | objects | select(.name? == \"orders-canary\") | .subsets[]? | .healthyEndpoints] | length == 2 and all(. >= 1)'"

# count_versions N: N calls from frontend's sidecar to orders; prints "v1 count, v2 count".
count_versions() {
  local i v1=0 v2=0 version
  for ((i = 0; i < $1; i++)); do
    version=$(curl -sS --max-time 5 -x http://127.0.0.1:18001 http://orders/ | jq -r '(objects | .version) // "error"' 2>/dev/null) || version=error
    case $version in v1) v1=$((v1 + 1)) ;; v2) v2=$((v2 + 1)) ;; esac
  done
  echo "$v1 $v2"
}
printf '\n   %sTrafficSplit orders-canary: v1 80, v2 20%s\n' "$BOLD" "$RESET"
# 400 draws at 20 %: 80 expected, sigma 8; 5 sigmas either side (40-120)
# fail a correct split once in ~1.7 million runs, a 50/50 one always.
read -r v1 v2 < <(count_versions 400)
info "400 calls from frontend's sidecar to orders: v1 answered $v1, v2 answered $v2"
((v1 + v2 == 400 && v2 >= 40 && v2 <= 120)) && ok "about a fifth went to v2" || bad "split not as configured"

printf '\n   %sRateLimitPolicy inventory-limit: 5 at once, 5 per second (inbound, at inventory'"'"'s sidecar)%s\n' "$BOLD" "$RESET"
# One curl sending 20 requests concurrently (through orders v1's outbound sidecar): a burst that
# takes milliseconds, so the bucket's refill (5/s) adds at most one or two tokens even on a busy machine.
burst_urls=()
for ((i = 0; i < 20; i++)); do burst_urls+=(http://inventory/work); done
burst_codes=$(curl -sS --max-time 10 --parallel --parallel-immediate --parallel-max 20 \
  -x http://127.0.0.1:18101 -o /dev/null -w '%{http_code}\n' "${burst_urls[@]}" 2>/dev/null) || true
accepted=$(grep -c '^200$' <<<"$burst_codes") || true
limited=$(grep -c '^429$' <<<"$burst_codes") || true
info "20 calls at once to inventory: $accepted accepted, $limited refused with 429"
((accepted >= 5 && accepted <= 8 && accepted + limited == 20)) && ok "the burst was cut at the bucket's capacity" || bad "rate limit not as configured"
request -x http://127.0.0.1:18101 http://inventory/work   # right after the burst: the bucket is empty
printf '   one refusal, as the caller sees it:\n'
grep -iE '^(HTTP/|retry-after|ratelimit|x-meshlet-reason)' "$WORK/headers" | tr -d '\r' | sed 's/^/     /'
info "     $(tr -d '\n' <"$WORK/body")"

printf '\n   %sCircuitBreakerPolicy orders-breaker: both orders instances start failing%s\n' "$BOLD" "$RESET"
curl -fsS -X POST http://127.0.0.1:18081/fail >/dev/null && curl -fsS -X POST http://127.0.0.1:18082/fail >/dev/null
line=""
for ((i = 1; i <= 10; i++)); do
  request -x http://127.0.0.1:18001 http://orders/
  line+=" $CODE${REASON:+($REASON)}"
done
info "10 calls from frontend's sidecar to orders:$line"
[[ $line == *"circuit_open"* ]] && ok "after 3 failures per instance the breakers opened: refused without calling orders" || bad "no circuit_open refusal"
curl -fsS -X POST http://127.0.0.1:18081/recover >/dev/null && curl -fsS -X POST http://127.0.0.1:18082/recover >/dev/null
info "orders recovered; after openDuration (3s) a trial request closes each breaker"
wait_until "calls to orders succeed again" 15 curl -fsS -o /dev/null -x http://127.0.0.1:18001 http://orders/

printf '\n   %sHistory and rollback%s\n' "$BOLD" "$RESET"
run_shown meshctl history --resources-only --limit 3 || bad "meshctl history failed"
run_shown meshctl rollback "$REV_BEFORE_POLICIES" || bad "meshctl rollback failed"
wait_until "frontend's sidecar dropped the traffic split" 5 \
  bash -c "! curl -fsS http://127.0.0.1:18020/config_dump | grep -q orders-canary"
run_shown meshctl get ratelimitpolicies || true

section "Ingress gateway: clients enter through edge (sidecar --mode gateway), routed by Routes"
info "edge has no app: its inbound :$GW_IN takes external clients, the Route shop (examples/policies/gateway/)"
info "says where each goes, and it calls the services as a mesh client with its own identity (mTLS)"
sidecar_tokens edge
start edge-gateway env NO_COLOR=1 "$BIN/sidecar" --mode gateway --service edge \
  --inbound-ip 127.0.0.1 --inbound-port "$GW_IN" --outbound-port "$GW_OUT" --admin-port "$GW_ADMIN" \
  --control-plane "$MESHLET_SERVER" --token-file "$TOKENS/edge.token" --ca-file "$CA_FILE" \
  --snapshot-file "$LOG_DIR/edge.snapshot.json"
wait_for edge-gateway "http://127.0.0.1:$GW_ADMIN/ready"
run_shown meshctl apply -f examples/policies/gateway || bad "meshctl apply failed"
run_shown meshctl get routes || bad "meshctl get routes failed"
GW_URL=http://127.0.0.1:$GW_IN
wait_until "the gateway routes shop.example.com/api to orders" 5 \
  curl -fsS -o /dev/null --max-time 2 -H 'Host: shop.example.com' "$GW_URL/api/"

# gateway_versions N [CURL_ARGS...]: N requests to shop.example.com/api/ through
# the gateway; prints "v1 count, v2 count, requests that carried x-from: edge".
gateway_versions() {
  local n=$1 i v1=0 v2=0 tagged=0 body
  shift
  for ((i = 0; i < n; i++)); do
    body=$(curl -sS --max-time 5 -H 'Host: shop.example.com' "$@" "$GW_URL/api/") || body='{}'
    case $(jq -r '.version // "error"' <<<"$body" 2>/dev/null) in v1) v1=$((v1 + 1)) ;; v2) v2=$((v2 + 1)) ;; esac
    [[ $(jq -r '.headers["x-from"] // ""' <<<"$body" 2>/dev/null) == edge ]] && tagged=$((tagged + 1))
  done
  echo "$v1 $v2 $tagged"
}
read -r v1 v2 tagged < <(gateway_versions 20)
info "20 × GET shop.example.com/api/: orders v1 answered $v1, v2 answered $v2; $tagged arrived as / with x-from: edge"
((v1 + v2 == 20 && v1 > 0 && v2 > 0 && tagged == 20)) &&
  ok "/api/* → orders (prefix rewritten to /, header set), balanced over both instances" || bad "path routing not as configured"
read -r v1 v2 tagged < <(gateway_versions 20 -H 'x-canary: true')
info "20 × the same with x-canary: true: orders v1 answered $v1, v2 answered $v2"
((v1 == 0 && v2 == 20)) && ok "the canary header reaches orders v2 only" || bad "canary routing not as configured"
mirrored=$(curl -fsS "http://127.0.0.1:$GW_ADMIN/metrics" |
  awk '/^meshlet_mirror_requests_total\{/ && /service="inventory"/ && /outcome="sent"/ { n += $NF } END { print n + 0 }')
info "copies mirrored to inventory (meshlet_mirror_requests_total{outcome=\"sent\"}): $mirrored"
((mirrored >= 20)) && ok "every /api request without the canary header was mirrored" || bad "expected at least 20 mirrored copies"
request -H 'Host: shop.example.com' "$GW_URL/work"
chain=$(jq -r '[.service, .calls[0].body.service, .calls[0].body.calls[0].body.service] | join(" -> ")' <<<"$BODY" 2>/dev/null) || chain=""
[[ $CODE == 200 && $chain == "frontend -> orders -> inventory" ]] &&
  ok "shop.example.com/work → frontend: $chain" || bad "/work through the gateway: $CODE $chain"
request -H 'Host: unknown.example.com' "$GW_URL/"
info "an unknown host: $CODE, x-meshlet-reason: ${REASON:-none}"
[[ $CODE == 404 && $REASON == no_route ]] && ok "no route → 404 no_route, said plainly" || bad "expected 404 no_route"

section "Fault injection and a dry-run limit (examples/policies/faults/)"
info "inventory-slow: callers of inventory wait 200 ms more on half their calls;"
info "inventory-dry-run: a rate limit of 2 at once that refuses nothing, only counts"
run_shown meshctl apply -f examples/policies/faults || bad "meshctl apply failed"
for admin in 18120 18220; do
  wait_until "orders' sidecar (admin :$admin) has the fault" 5 \
    bash -c "curl -fsS http://127.0.0.1:$admin/config_dump | grep -q inventory-slow"
done
wait_until "inventory's sidecar has the dry-run limit" 5 \
  bash -c "curl -fsS http://127.0.0.1:18320/config_dump | grep -q inventory-dry-run"
# faults_injected: the delays orders' two sidecars injected so far.
faults_injected() {
  local admin
  for admin in 18120 18220; do curl -fsS "http://127.0.0.1:$admin/metrics" || true; done |
    awk '/^meshlet_faults_injected_total\{/ && /policy="inventory-slow"/ { n += $NF } END { print n + 0 }'
}
injected_before=$(faults_injected)
slowed=0 answered=0 SLOW_TRACE=""
line=""
for ((i = 0; i < 40; i++)); do
  trace_id=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  request -H 'Host: shop.example.com' -H "traceparent: 00-$trace_id-$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')-01" "$GW_URL/work"
  [[ $CODE == 200 ]] && answered=$((answered + 1))
  if ((TIME_MS >= 200)); then slowed=$((slowed + 1)); SLOW_TRACE=$trace_id; fi
  line+=" $TIME_MS"
done
injected=$(($(faults_injected) - injected_before))
info "40 × shop.example.com/work (ms):$line"
info "$answered answered 200, $slowed took ≥ 200 ms; orders' sidecars injected $injected delays (meshlet_faults_injected_total)"
((answered == 40)) && ok "the dry-run limit refused nothing (no 429)" || bad "$((40 - answered)) requests failed"
# The sidecars' own count is the draw (40 at 50 %: sigma 3.2, 5 sigmas is
# 5-35); every delayed request took the 200 ms (a busy machine may slow
# others too, so the clock only bounds it from below).
((injected >= 5 && injected <= 35 && slowed >= injected)) && ok "about half were delayed by the injected fault" ||
  bad "expected about 20 of 40 delayed ($injected injected, $slowed took ≥ 200 ms)"
if [[ -n $SLOW_TRACE ]]; then
  fault_in_trace() {
    cp_curl -fsS --max-time 2 "$MESHLET_SERVER/api/traces/$1" | jq -e '[.spans[] | select(.attributes["meshlet.fault"] != null)] | length >= 1'
  }
  wait_until "a slow request's trace reached the control plane with the fault on its span" 10 fault_in_trace "$SLOW_TRACE"
  run_shown meshctl trace "$SLOW_TRACE" || bad "meshctl trace failed"
  cp_curl -fsS --max-time 2 "$MESHLET_SERVER/api/traces/$SLOW_TRACE" |
    jq -r '.spans[] | select(.attributes["meshlet.fault"] != null) | "the \(.service) \(.kind) span carries meshlet.fault = \(.attributes["meshlet.fault"])"' |
    while read -r line; do info "$line"; done
fi
counted=$(curl -fsS http://127.0.0.1:18320/metrics |
  awk '/^meshlet_policy_would_refuse_total\{/ && /policy="inventory-dry-run"/ { n += $NF } END { print n + 0 }')
info "inventory's sidecar counted $counted requests the dry-run limit would have refused (meshlet_policy_would_refuse_total)"
((counted > 0)) && ok "the dry-run limit counted what it would have cut, and cut nothing" || bad "expected would-refuse counts"
would_refuse() { "$BIN/meshctl" describe ratelimitpolicy inventory-dry-run | grep -Eq '^Would refuse: .* [1-9][0-9]* in the last 5m'; }
wait_until "inventory's sidecar reported them to the control plane (stats every 5 s)" 15 would_refuse
run_shown meshctl describe ratelimitpolicy inventory-dry-run || bad "meshctl describe failed"
run_shown meshctl delete -f examples/policies/faults || bad "meshctl delete failed"

section "Summary"
run_shown meshctl describe service orders || bad "meshctl describe failed"
if ((FAILURES)); then
  printf '   %s%d check(s) did not go as expected (see FAIL above)%s\n' "$RED" "$FAILURES" "$RESET"
else
  ok "every step went as expected"
fi
info "logs: $LOG_DIR"

if ((KEEP_RUNNING)); then
  section "Keeping traffic flowing (one request per second); Ctrl-C to stop"
  info "the dashboard (services, topology, policies, traces; live): $MESHLET_SERVER/"
  info "  (log in with the admin token in $DATA_DIR/admin.token; the browser does not know"
  info "   the demo's CA, $CA_FILE, so it warns about the certificate)"
  info "meanwhile, in another terminal:"
  info "  export MESHLET_SERVER=$MESHLET_SERVER MESHLET_CA_FILE=$CA_FILE PATH=$BIN:\$PATH"
  info "  export MESHLET_TOKEN=\$(cat $DATA_DIR/admin.token)"
  info "  meshctl get services; meshctl describe service orders"
  info "  curl -X POST http://127.0.0.1:18081/health/fail    # watch orders v1 drop out"
  info "  curl http://127.0.0.1:18020/config_dump | jq .snapshot   # what frontend's sidecar routes with"
  info "  curl --cacert \$MESHLET_CA_FILE -H \"Authorization: Bearer \$MESHLET_TOKEN\" $MESHLET_SERVER/api/v1/services"
  IN_KEEP_RUNNING=1
  for ((i = 1; ; i++)); do
    for name in "${!PID_OF[@]}"; do
      kill -0 "${PID_OF[$name]}" 2>/dev/null || die "$name exited (log: $LOG_DIR/$name.log)"
    done
    one_round "$i"
    sleep 1
  done
else
  info "to keep it running, open the dashboard and poke at it with meshctl: $0 --keep-running"
fi
((FAILURES == 0))
