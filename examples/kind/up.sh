#!/usr/bin/env bash
# meshlet in a local kind cluster: creates the cluster, builds and loads the
# images, applies the manifests and the demo policies, and prints how to
# reach the demo and the dashboard.
#
#   1. kind create cluster --config manifests/kind/cluster.yaml (name meshlet;
#      reused if it exists)
#   2. docker build the images sidecar, control-plane, demo-service
#      (tag: the workspace version) and kind load them
#   3. kubectl apply -k manifests/overlays/kind; wait for the rollouts
#   4. meshctl apply the policies of examples/policies/demo/ (meshctl runs
#      inside the control plane's pod, so no local build is needed)
#
# Usage: examples/kind/up.sh [--no-build]
#   --no-build   load the images already built instead of building them
#
# Needs docker (running), kind and kubectl. Every kubectl call names the
# context kind-meshlet, so no other cluster is touched. examples/kind/down.sh
# removes it all.
set -euo pipefail

BUILD=1
while (($#)); do
  case "$1" in
    --no-build) BUILD=0 ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

CLUSTER=meshlet # the name in manifests/kind/cluster.yaml
CONTEXT=kind-$CLUSTER
ROLLOUT_TIMEOUT=${MESHLET_ROLLOUT_TIMEOUT:-300s}
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
IMAGES=(sidecar control-plane demo-service)

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
k() { kubectl --context "$CONTEXT" "$@"; }

step "prerequisites"
missing=()
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  die "missing: ${missing[*]}. Install docker (https://docs.docker.com/engine/install/), kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation) and kubectl (https://kubernetes.io/docs/tasks/tools/), then run this again."
fi
docker info >/dev/null 2>&1 || die "docker is installed but its daemon does not answer (is it running, and may this user use it?)"
[[ -n $VERSION ]] || die "cannot read the workspace version from Cargo.toml"
echo "docker, kind and kubectl found; images will be tagged $VERSION"

step "kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "cluster $CLUSTER exists; reusing it"
else
  kind create cluster --config manifests/kind/cluster.yaml --wait 120s
fi

if ((BUILD)); then
  for image in "${IMAGES[@]}"; do
    step "docker build meshlet/$image:$VERSION"
    DOCKER_BUILDKIT=1 docker build --target "$image" -t "meshlet/$image:$VERSION" .
  done
fi

step "kind load the images"
for image in "${IMAGES[@]}"; do
  docker image inspect "meshlet/$image:$VERSION" >/dev/null 2>&1 ||
    die "image meshlet/$image:$VERSION not found; run without --no-build"
  kind load docker-image --name "$CLUSTER" "meshlet/$image:$VERSION"
done

step "kubectl apply -k manifests/overlays/kind"
k apply -k manifests/overlays/kind

step "waiting for the rollouts (at most $ROLLOUT_TIMEOUT each)"
k -n meshlet rollout status statefulset/meshlet-control-plane --timeout "$ROLLOUT_TIMEOUT"
for deployment in inventory orders-v1 orders-v2 frontend; do
  k -n default rollout status "deployment/$deployment" --timeout "$ROLLOUT_TIMEOUT"
done

step "meshctl apply -f examples/policies/demo/"
# One stream of documents, applied all or nothing by the meshctl inside the
# control plane's image (its server defaults to 127.0.0.1:15010 there).
for file in examples/policies/demo/*.yaml; do
  cat "$file"
  printf '\n---\n'
done | k -n meshlet exec -i meshlet-control-plane-0 -c control-plane -- meshctl apply -f -

cat <<TEXT

meshlet is running in kind cluster $CLUSTER (kubectl context $CONTEXT).

  kubectl --context $CONTEXT get pods      # each demo pod 2/2: the app and its native sidecar
  curl http://127.0.0.1:8080/work           # frontend -> orders (v1 80 %, v2 20 %) -> inventory
  http://127.0.0.1:15010/                   # the dashboard, in a browser (control plane NodePort)
  export MESHLET_SERVER=http://127.0.0.1:15010
  meshctl get services                      # or: kubectl -n meshlet exec meshlet-control-plane-0 -- meshctl get services

Without the NodePorts (another cluster), port-forward instead:
  kubectl --context $CONTEXT -n meshlet port-forward svc/meshlet-control-plane 15010:15010
  kubectl --context $CONTEXT port-forward deploy/frontend 8080:15006   # frontend's inbound sidecar

Remove everything: examples/kind/down.sh
TEXT
