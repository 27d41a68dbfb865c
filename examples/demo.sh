#!/usr/bin/env bash
# meshlet local demo: two services, each with a standalone sidecar, on 127.0.0.1.
#
#   frontend app :18080  <- frontend sidecar  inbound :18006  outbound :18001  admin :18020
#   orders   app :18081  <- orders   sidecar  inbound :18106  outbound :18101  admin :18120
#
# `curl http://127.0.0.1:18006/work` enters frontend through its sidecar;
# frontend calls `orders` through its outbound sidecar (HTTP_PROXY), which
# sends the call to the orders sidecar's inbound listener (examples/mesh.yaml),
# which hands it to the orders app.
#
# Usage: examples/demo.sh [--keep-running] [--rounds N]
#   --keep-running  after the tour, keep sending traffic until Ctrl-C
#   --rounds N      requests in the traffic phase (default 20)
#
# Needs only Rust (cargo) and curl; curl is installed with apt-get if missing.
# Every process logs to a temporary directory that is printed at the end.
set -euo pipefail

ROUNDS=20
KEEP_RUNNING=0
READY_TIMEOUT=${DEMO_READY_TIMEOUT:-30} # seconds

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

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
CONFIG=examples/mesh.yaml

# Demo ports (keep in sync with examples/mesh.yaml).
FRONTEND_APP=18080 ORDERS_APP=18081
FRONTEND_IN=18006 FRONTEND_OUT=18001 FRONTEND_ADMIN=18020
ORDERS_IN=18106 ORDERS_OUT=18101 ORDERS_ADMIN=18120

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
if ! command -v curl >/dev/null 2>&1; then
  info "curl is missing; installing it with apt-get"
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "curl is missing and neither root nor sudo is available"
    SUDO=(sudo)
  fi
  "${SUDO[@]}" apt-get update
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl ca-certificates
fi
if ! command -v cargo >/dev/null 2>&1 && [[ -f $HOME/.cargo/env ]]; then
  # shellcheck disable=SC1091
  source "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust from https://rustup.rs"
info "curl: $(command -v curl), cargo: $(command -v cargo)"

# All demo traffic goes to 127.0.0.1 directly: a proxy from the user's
# environment must not capture it (the children get their own HTTP_PROXY).
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY

section "Building (cargo build --release --bins)"
cargo build --release --bins
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
BIN=$TARGET_DIR/release
for exe in sidecar demo-service; do
  [[ -x $BIN/$exe ]] || die "$BIN/$exe was not built"
done

# ---------------------------------------------------------------- processes
LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/meshlet-demo.XXXXXX")
WORK=$LOG_DIR/.http # scratch files for responses
mkdir -p "$WORK"
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

# start NAME COMMAND...: run in the background, logging to $LOG_DIR/NAME.log.
start() {
  local name=$1
  shift
  "$@" >>"$LOG_DIR/$name.log" 2>&1 &
  PID_OF[$name]=$!
  info "started $name (pid $!): $*"
}

stop() {
  local name=$1 pid=${PID_OF[$1]}
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "PID_OF[$name]"
  info "stopped $name (pid $pid)"
}

# wait_for NAME URL: poll until URL answers 200, NAME exits, or the deadline passes.
wait_for() {
  local name=$1 url=$2 deadline=$((SECONDS + READY_TIMEOUT))
  until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
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

start_orders_app() {
  start orders-app "$BIN/demo-service" --name orders --port "$ORDERS_APP" --version v1
}

section "Starting two services and their sidecars (logs in $LOG_DIR)"
for port in $FRONTEND_APP $ORDERS_APP $FRONTEND_IN $FRONTEND_OUT $FRONTEND_ADMIN $ORDERS_IN $ORDERS_OUT $ORDERS_ADMIN; do
  port_in_use "$port" && die "port $port on 127.0.0.1 is already in use (another demo still running?)"
done
start_orders_app
start frontend-app env HTTP_PROXY="http://127.0.0.1:$FRONTEND_OUT" \
  "$BIN/demo-service" --name frontend --port "$FRONTEND_APP" --version v1 --calls orders
# MESHLET_INBOUND_IP keeps the demo's inbound listeners off the network;
# NO_COLOR keeps the log files free of terminal escapes.
start orders-sidecar env MESHLET_INBOUND_IP=127.0.0.1 NO_COLOR=1 "$BIN/sidecar" --service orders \
  --app-port "$ORDERS_APP" --inbound-port "$ORDERS_IN" --outbound-port "$ORDERS_OUT" \
  --admin-port "$ORDERS_ADMIN" --config "$CONFIG"
start frontend-sidecar env MESHLET_INBOUND_IP=127.0.0.1 NO_COLOR=1 "$BIN/sidecar" --service frontend \
  --app-port "$FRONTEND_APP" --inbound-port "$FRONTEND_IN" --outbound-port "$FRONTEND_OUT" \
  --admin-port "$FRONTEND_ADMIN" --config "$CONFIG"

wait_for orders-app "http://127.0.0.1:$ORDERS_APP/health"
wait_for frontend-app "http://127.0.0.1:$FRONTEND_APP/health"
wait_for orders-sidecar "http://127.0.0.1:$ORDERS_ADMIN/ready"
wait_for frontend-sidecar "http://127.0.0.1:$FRONTEND_ADMIN/ready"

# ---------------------------------------------------------------- helpers
# request ARGS...: run curl; sets CODE, BODY (one line), REASON (x-meshlet-reason), TIME_MS.
request() {
  local out
  : >"$WORK/headers"
  : >"$WORK/body"
  out=$(curl -sS --max-time 10 -D "$WORK/headers" -o "$WORK/body" -w '%{http_code} %{time_total}' "$@" 2>"$WORK/err") || true
  CODE=${out%% *}
  TIME_MS=$(awk -v t="${out##* }" 'BEGIN { printf "%.0f", t * 1000 }')
  BODY=$(tr -d '\r\n' <"$WORK/body")
  [[ -s $WORK/err ]] && BODY="$(tr -d '\r\n' <"$WORK/err") $BODY"
  REASON=$(grep -i '^x-meshlet-reason:' "$WORK/headers" | head -n 1 | cut -d: -f2- | tr -d ' \r') || true
}

# field NAME: first string value of "NAME":"..." in BODY.
field() { grep -o "\"$1\":\"[^\"]*\"" <<<"$BODY" | head -n 1 | cut -d'"' -f4 || true; }

# quoted ARGS...: the arguments as one would type them.
quoted() {
  local arg
  for arg in "$@"; do
    if [[ $arg =~ [^A-Za-z0-9_./:=@-] ]]; then printf " '%s'" "$arg"; else printf ' %s' "$arg"; fi
  done
}

# show EXPECTED_CODE DESCRIPTION CURL_ARGS...: run one request and print it.
show() {
  local want=$1 what=$2
  shift 2
  printf '\n   %s%s%s\n   $ curl%s\n' "$BOLD" "$what" "$RESET" "$(quoted "$@")"
  request "$@"
  info "-> HTTP $CODE${REASON:+  x-meshlet-reason: $REASON}  (${TIME_MS} ms)"
  info "   ${DIM}${BODY:0:300}${RESET}"
  if [[ $CODE == "$want" ]]; then ok "got $want as expected"; else bad "expected $want, got $CODE"; fi
}

declare -A STATUS_COUNT=() ANSWERED_COUNT=()
# one_round N: one request through frontend's inbound listener, one summary line.
one_round() {
  local n=$1 trace_id span_id seen trace answered xff
  trace_id=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  span_id=$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')
  request -H "traceparent: 00-$trace_id-$span_id-01" "http://127.0.0.1:$FRONTEND_IN/work"
  STATUS_COUNT[$CODE]=$((${STATUS_COUNT[$CODE]:-0} + 1))
  # orders' `GET /` answer is nested in frontend's: {"port":..,"service":..,"version":..}
  answered=$(grep -o '"port":[0-9]*,"service":"[^"]*","version":"[^"]*"' <<<"$BODY" | head -n 1 |
    sed -E 's/"port":([0-9]*),"service":"([^"]*)","version":"([^"]*)"/\2 \3 (:\1)/') || true
  xff=$(field x-forwarded-for)
  seen=$(field traceparent)
  if [[ -z $seen ]]; then trace=missing
  elif [[ $seen == 00-$trace_id-* ]]; then trace=kept
  else trace=changed; fi
  if [[ $CODE == 200 && -n $answered ]]; then
    ANSWERED_COUNT[$answered]=$((${ANSWERED_COUNT[$answered]:-0} + 1))
    printf '   %4s  %s  %-22s %-16s %-8s %5s ms\n' "$n" "$CODE" "$answered" "${xff:--}" "$trace" "$TIME_MS"
  else
    local why=${REASON:-$(field x-meshlet-reason)}
    printf '   %4s  %s%s%s  %s\n' "$n" "$RED" "$CODE" "$RESET" "${why:+x-meshlet-reason=$why  }${BODY:0:160}"
  fi
}
round_header() {
  printf '   %s%4s  %s  %-22s %-16s %-8s %8s%s\n' "$DIM" '#' 'st.' 'answered by' 'x-fwd-for@orders' 'trace' 'time' "$RESET"
}

# ---------------------------------------------------------------- traffic
section "Traffic: $ROUNDS x curl http://127.0.0.1:$FRONTEND_IN/work"
info "client -> frontend sidecar :$FRONTEND_IN -> frontend :$FRONTEND_APP -> outbound :$FRONTEND_OUT"
info "       -> orders sidecar :$ORDERS_IN -> orders :$ORDERS_APP   (each request carries a fresh traceparent)"
round_header
for ((i = 1; i <= ROUNDS; i++)); do one_round "$i"; done
TRAFFIC_OK=${STATUS_COUNT[200]:-0}
summary=""
for code in "${!STATUS_COUNT[@]}"; do summary+=" $code x${STATUS_COUNT[$code]}"; done
info "status codes:$summary"
for who in "${!ANSWERED_COUNT[@]}"; do info "answered by $who: ${ANSWERED_COUNT[$who]}"; done
if ((TRAFFIC_OK == ROUNDS)); then ok "all $ROUNDS requests succeeded"; else bad "$((ROUNDS - TRAFFIC_OK)) of $ROUNDS requests failed"; fi

section "Three ways to reach a service through the outbound listener"
show 200 "1. HTTP proxy, absolute-form URI (what HTTP_PROXY does)" \
  -x "http://127.0.0.1:$FRONTEND_OUT" http://orders/
show 200 "2. plain request whose Host names the service" \
  -H 'Host: orders' "http://127.0.0.1:$FRONTEND_OUT/"
show 200 "3. an address that is not in the registry passes through (straight to the orders app)" \
  -x "http://127.0.0.1:$FRONTEND_OUT" "http://127.0.0.1:$ORDERS_APP/"

section "When the mesh refuses: errors carry x-meshlet-reason"
show 503 "unknown service" -x "http://127.0.0.1:$FRONTEND_OUT" http://no-such-service/
[[ $CODE != 503 || $REASON == unknown_service ]] || bad "expected x-meshlet-reason: unknown_service, got '${REASON}'"

printf '\n'
stop orders-app
show 502 "orders' app is down: direct call through the outbound listener" \
  -x "http://127.0.0.1:$FRONTEND_OUT" http://orders/
[[ -n $REASON ]] || bad "the 502 carries no x-meshlet-reason header"
show 502 "orders' app is down: frontend's /work reports the refused call" \
  "http://127.0.0.1:$FRONTEND_IN/work"
[[ -n $(field x-meshlet-reason) ]] || bad "frontend saw no x-meshlet-reason from the mesh"
printf '\n'
start_orders_app
wait_for orders-app "http://127.0.0.1:$ORDERS_APP/health"
wait_for orders-sidecar "http://127.0.0.1:$ORDERS_ADMIN/ready"
show 200 "orders is back" "http://127.0.0.1:$FRONTEND_IN/work"

# ---------------------------------------------------------------- metrics
section "Observability"
for pair in "frontend:$FRONTEND_ADMIN" "orders:$ORDERS_ADMIN"; do
  name=${pair%%:*} port=${pair##*:}
  if metrics=$(curl -fsS --max-time 5 "http://127.0.0.1:$port/metrics"); then
    info "$name sidecar: $(wc -l <<<"$metrics") lines at http://127.0.0.1:$port/metrics," \
      "$(grep -c '^request_total' <<<"$metrics" || true) request_total series"
  else
    bad "$name sidecar: /metrics did not answer"
  fi
done
info "also: http://127.0.0.1:$FRONTEND_ADMIN/config_dump  http://127.0.0.1:$FRONTEND_ADMIN/ready"

section "Summary"
info "traffic: $TRAFFIC_OK/$ROUNDS requests OK; status codes:$summary"
info "logs:    $LOG_DIR/{frontend,orders}-{app,sidecar}.log"
if ((FAILURES)); then
  printf '   %s%d check(s) did not go as expected (see FAIL above)%s\n' "$RED" "$FAILURES" "$RESET"
else
  ok "every step went as expected"
fi

if ((KEEP_RUNNING)); then
  section "Keeping traffic flowing (one request per second); Ctrl-C to stop"
  info "meanwhile, try: curl -x http://127.0.0.1:$FRONTEND_OUT http://orders/"
  info "                curl http://127.0.0.1:$FRONTEND_ADMIN/metrics"
  IN_KEEP_RUNNING=1
  round_header
  for ((i = 1; ; i++)); do
    for name in "${!PID_OF[@]}"; do
      kill -0 "${PID_OF[$name]}" 2>/dev/null || die "$name exited (log: $LOG_DIR/$name.log)"
    done
    one_round "$i"
    sleep 1
  done
else
  info "to keep it running and poke at it: $0 --keep-running"
fi
((FAILURES == 0))
