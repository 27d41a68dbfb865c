#!/usr/bin/env bash
# meshlet's whole test suite: README command (2), and exactly what CI runs
# (.ci/run calls this script). Works on a fresh Debian machine with Rust
# installed; installs anything else it needs.
#
#   1. style gates: cargo fmt --check, cargo clippy -D warnings
#   2. build every binary once (release), then run every test against them:
#      unit tests in each crate, end-to-end tests in tests/e2e/ that start
#      the real `sidecar` processes on free loopback ports
#   3. the local demo (examples/demo.sh) as a smoke test of README command (1)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
# The metrics e2e tests run `promtool check metrics` on the sidecar's /metrics.
command -v promtool >/dev/null || need_apt+=(prometheus)
# The transparent-mode e2e tests (tests/e2e/transparent.rs) run apps and
# sidecars in network namespaces (iproute2) with the rules of
# `sidecar init-iptables` (iptables) and the sidecar as UID 1337 (setpriv).
command -v ip >/dev/null || need_apt+=(iproute2)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v setpriv >/dev/null || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
    step "installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --release -- -D warnings

step "build all binaries (release)"
cargo build --workspace --bins --release

step "unit and end-to-end tests"
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
cargo test --workspace --release 2>&1 | tee "$test_log"
# Totals over every test binary (cargo prints one "test result" per binary).
read -r passed failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$test_log")

step "local demo smoke test (examples/demo.sh)"
bash examples/demo.sh

printf '\nall checks passed\n'
printf 'tests: %d passed, %d failed\n' "$passed" "$failed"
