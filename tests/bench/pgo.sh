#!/usr/bin/env bash
# meshlet: the sidecar built with profile-guided optimisation (PGO).
#
# The `dist` profile (Cargo.toml: fat LTO, one codegen unit) lets rustc
# inline across crates, but it still guesses which branches are hot and lays
# the code out in source order. PGO replaces the guesses with counts from a
# real run: an instrumented build of the sidecar serves a training workload,
# the counts are merged, and the sidecar is compiled again with them (hot
# paths inlined and laid out together, cold paths such as error handling
# moved out of the way). The proxy's code does not change, only the machine
# code rustc emits for it.
#
# Steps (each build in its own target dir under target/pgo/: RUSTFLAGS are
# part of every crate's fingerprint, so sharing target/ would rebuild the
# normal builds after each of these):
#
#   1. llvm-profdata from rustup's llvm-tools component (added when missing;
#      it must match rustc's LLVM, a distribution's llvm-profdata will not do)
#   2. instrumented build: `cargo build --profile dist` with
#      RUSTFLAGS=-Cprofile-generate -> target/pgo/instrumented/dist/sidecar
#   3. training, every request on loopback, the instrumented sidecar stopped
#      with TERM so that it writes its counts:
#        profile.sh natively (no callgrind): HTTP/1.1 keep-alive GETs inbound
#          without policies, inbound with a rate limit, tracing and span
#          export, outbound with a breaker, retries and a timeout, POSTs with
#          a body, inbound with all.sh's goal-1 policies (PGO_REQUESTS each)
#        mtls.sh, one short round: two hops plaintext (HTTP/1.1 pool between
#          the sidecars) and two hops with mTLS + HTTP/2 between sidecars
#          registered with a control plane (certificates, pushes, handshakes)
#      The training runs write their tables to target/pgo/training, not to
#      target/bench.
#   4. llvm-profdata merge -> target/pgo/sidecar.profdata
#   5. optimised build: RUSTFLAGS=-Cprofile-use -> target/pgo/sidecar
#
# The workload is deliberately broader than the benchmark's goal-1 row (it
# covers outbound, bodies, span export, mTLS and HTTP/2), so that the build
# is not tuned to one row: code that never runs in training is optimised for
# size, and the paths users run should all be in it.
#
# Usage: tests/bench/pgo.sh          prints the path of the built sidecar
#   PGO_REQUESTS=100000   requests per profile.sh scenario
#   PGO_SKIP_BUILD=1      the release binaries (control plane, meshctl) are
#                         already built (all.sh builds them itself)
# Takes ~8 min on 2 cores (two fat-LTO builds of the sidecar and its
# dependencies, ~1 min of training). Needs rustup (for llvm-tools) and the
# benchmarks' packages (nginx, wrk, h2load; installed when missing).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
REQUESTS="${PGO_REQUESTS:-100000}"
PGO_DIR="$ROOT/target/pgo"
RAW_DIR="$PGO_DIR/raw"
PROFDATA="$PGO_DIR/sidecar.profdata"
INSTRUMENTED="$PGO_DIR/instrumented/dist/sidecar"
OUT="$PGO_DIR/sidecar"
# shellcheck source=tests/bench/lib.sh
source "$SCRIPT_DIR/lib.sh"

install_deps h2load:nghttp2-client ss:iproute2
mkdir -p "$PGO_DIR"

# ---------------------------------------------------------- llvm-profdata --
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA_TOOL="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [[ ! -x "$PROFDATA_TOOL" ]]; then
    command -v rustup >/dev/null || die "llvm-profdata is missing and there is no rustup to add llvm-tools"
    log "rustup component add llvm-tools (llvm-profdata matching rustc's LLVM)"
    rustup component add llvm-tools-preview >&2
fi
[[ -x "$PROFDATA_TOOL" ]] || die "no llvm-profdata at $PROFDATA_TOOL after adding llvm-tools"

# dist_build TARGET_DIR RUSTFLAGS: the sidecar with the dist profile.
dist_build() {
    log "cargo build --profile dist --bin sidecar (RUSTFLAGS=$2, target dir $1)"
    (cd "$ROOT" && RUSTFLAGS="$2" CARGO_TARGET_DIR="$1" \
        cargo build --profile dist -p meshlet-sidecar --bin sidecar >&2)
}

# -------------------------------------------------------------- training --
if [[ "${PGO_SKIP_BUILD:-0}" != 1 ]]; then
    log "cargo build --release --bins (control plane and meshctl for the mTLS training)"
    (cd "$ROOT" && cargo build --release --bins >&2)
fi
dist_build "$PGO_DIR/instrumented" "-Cprofile-generate=$RAW_DIR"
rm -rf "$RAW_DIR"

# The training scripts get their own output dir and a bin dir whose sidecar
# is the instrumented one (control plane and meshctl: the release builds).
training_bins="$PGO_DIR/training-bins"
rm -rf "$training_bins"
mkdir -p "$training_bins" "$PGO_DIR/training"
ln -s "$INSTRUMENTED" "$training_bins/sidecar"
ln -s "$ROOT/target/release/control-plane" "$training_bins/control-plane"
ln -s "$ROOT/target/release/meshctl" "$training_bins/meshctl"

log "training 1/2: profile.sh scenarios, $REQUESTS requests each"
BENCH_OUT_DIR="$PGO_DIR/training" PROFILE_CALLGRIND=0 PROFILE_REQUESTS="$REQUESTS" \
    PROFILE_SCENARIOS="inbound policies outbound post row-policies" \
    bash "$SCRIPT_DIR/profile.sh" "$INSTRUMENTED" >/dev/null
log "training 2/2: mtls.sh, two hops plaintext and mTLS, one short round"
BENCH_OUT_DIR="$PGO_DIR/training" BENCH_BIN_DIR="$training_bins" BENCH_ROUNDS=1 \
    BENCH_DURATION=3s BENCH_WARMUP=1s \
    bash "$SCRIPT_DIR/mtls.sh" >/dev/null

shopt -s nullglob
raws=("$RAW_DIR"/*.profraw)
((${#raws[@]} > 0)) || die "the training wrote no profile under $RAW_DIR"
"$PROFDATA_TOOL" merge -o "$PROFDATA" "${raws[@]}"
log "merged ${#raws[@]} profile(s) into $PROFDATA"

# ---------------------------------------------------------- optimised build --
dist_build "$PGO_DIR/optimised" "-Cprofile-use=$PROFDATA"
cp "$PGO_DIR/optimised/dist/sidecar" "$OUT"
log "PGO sidecar: $OUT"
echo "$OUT"
