#!/usr/bin/env bash
# meshlet in a local kind cluster: creates the cluster, builds and loads the
# images, applies the manifests and the demo policies, and prints how to
# reach the demo and the dashboard.
#
#   1. kind create cluster --config manifests/kind/cluster.yaml (name meshlet;
#      reused if it exists)
#   2. docker build the images sidecar, control-plane, demo-service
#      (tag: the workspace version) and kind load them
#   3. kubectl apply -k manifests/base (namespace meshlet, the control
#      plane, its NetworkPolicy, the admission webhook's configuration);
#      wait for its rollout, then fill the webhook's caBundle with the
#      control plane's CA (automatic injection in namespaces labelled
#      meshlet.dev/inject=enabled)
#   4. the sidecars' credentials, in namespace default: a Secret
#      meshlet-sidecar-SERVICE (key token) per demo service, holding a token
#      made by `meshctl token create --role sidecar --service SERVICE`, and
#      the ConfigMap meshlet-ca (key ca.crt) with the control plane's CA
#      (/var/lib/meshlet/ca.crt in its pod); existing Secrets are kept
#   5. kubectl apply -k manifests/overlays/kind; wait for the rollouts
#   6. meshctl apply the policies of examples/policies/demo/ and the
#      gateway's Routes of examples/policies/gateway/
#   (meshctl runs inside the control plane's pod, as admin, so no local
#   build is needed)
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
    -h | --help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
# The services of manifests/examples/apps.yaml (their app.kubernetes.io/name),
# the ingress gateway of manifests/examples/gateway.yaml, and their
# namespace: each gets a sidecar token Secret.
SERVICES=(frontend orders inventory edge)
APP_NAMESPACE=default
CP_POD=meshlet-control-plane-0

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
k() { kubectl --context "$CONTEXT" "$@"; }
# meshctl in the control plane's container, as admin (its MESHLET_TOKEN_FILE
# and MESHLET_CA_FILE name the data directory's admin.token and ca.crt).
cp_meshctl() { k -n meshlet exec -i "$CP_POD" -c control-plane -- meshctl "$@"; }

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

step "kubectl apply -k manifests/base (the control plane)"
k apply -k manifests/base
k -n meshlet rollout status statefulset/meshlet-control-plane --timeout "$ROLLOUT_TIMEOUT"

step "sidecar credentials in namespace $APP_NAMESPACE: Secrets meshlet-sidecar-SERVICE, ConfigMap meshlet-ca"
SECRETS_DIR=$(mktemp -d) # 0700; the token files never leave it
trap 'rm -rf "$SECRETS_DIR"' EXIT
# The CA the control plane wrote on first start (its data directory is on
# the PVC, so it survives restarts).
k -n meshlet exec "$CP_POD" -c control-plane -- cat /var/lib/meshlet/ca.crt >"$SECRETS_DIR/ca.crt"
grep -q 'BEGIN CERTIFICATE' "$SECRETS_DIR/ca.crt" || die "no CA certificate in $CP_POD:/var/lib/meshlet/ca.crt"
# The API server trusts the webhook's serving certificate through caBundle
# (base64 of the PEM); re-applying the base keeps it (it is not in the file).
CA_BUNDLE=$(base64 <"$SECRETS_DIR/ca.crt" | tr -d '\n')
k patch mutatingwebhookconfiguration meshlet-inject --type json \
  -p "[{\"op\": \"add\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"$CA_BUNDLE\"}]"
k -n "$APP_NAMESPACE" create configmap meshlet-ca --from-file=ca.crt="$SECRETS_DIR/ca.crt" \
  --dry-run=client -o yaml | k apply -f -
for service in "${SERVICES[@]}"; do
  secret=meshlet-sidecar-$service
  if k -n "$APP_NAMESPACE" get secret "$secret" >/dev/null 2>&1; then
    echo "secret $secret exists; keeping its token"
    continue
  fi
  # A token of that name without its Secret (deleted by hand) is revoked
  # first; a first run has none, so an error here is expected and ignored.
  cp_meshctl token revoke "sidecar-$APP_NAMESPACE-$service" >/dev/null 2>&1 || true
  (umask 077 && cp_meshctl token create --role sidecar --namespace "$APP_NAMESPACE" \
    --service "$service" >"$SECRETS_DIR/$service.token") ||
    die "meshctl token create --role sidecar --service $service failed in $CP_POD"
  k -n "$APP_NAMESPACE" create secret generic "$secret" --from-file=token="$SECRETS_DIR/$service.token"
done
cp_meshctl token list

step "kubectl apply -k manifests/overlays/kind (the control plane and the injected demo apps)"
k apply -k manifests/overlays/kind

step "waiting for the rollouts (at most $ROLLOUT_TIMEOUT each)"
k -n meshlet rollout status statefulset/meshlet-control-plane --timeout "$ROLLOUT_TIMEOUT"
for deployment in inventory orders-v1 orders-v2 frontend edge; do
  k -n default rollout status "deployment/$deployment" --timeout "$ROLLOUT_TIMEOUT"
done

step "meshctl apply -f examples/policies/demo/ examples/policies/gateway/"
# One stream of documents, applied all or nothing by the meshctl inside the
# control plane's image (its server defaults to https://127.0.0.1:15010).
for file in examples/policies/demo/*.yaml examples/policies/gateway/*.yaml; do
  cat "$file"
  printf '\n---\n'
done | cp_meshctl apply -f -

cat <<TEXT

meshlet is running in kind cluster $CLUSTER (kubectl context $CONTEXT).

  kubectl --context $CONTEXT get pods      # each demo pod 2/2: the app and its native sidecar
  curl http://127.0.0.1:8080/work           # frontend -> orders (v1 80 %, v2 20 %) -> inventory
  curl -H 'Host: shop.example.com' http://127.0.0.1:8081/api/       # the ingress gateway edge -> orders (Route shop)
  curl -H 'Host: shop.example.com' -H 'x-canary: true' http://127.0.0.1:8081/api/   # -> orders v2 only
  kubectl --context $CONTEXT -n meshlet exec $CP_POD -- meshctl get services   # meshctl as admin, in the pod

The control plane's port 15010 stays in the cluster (a NetworkPolicy admits
only meshed pods); reach the API and dashboard from here with a port-forward:
  kubectl --context $CONTEXT -n meshlet port-forward svc/meshlet-control-plane 15010:15010 &
  kubectl --context $CONTEXT -n meshlet exec $CP_POD -- cat /var/lib/meshlet/ca.crt > meshlet-ca.crt
  export MESHLET_SERVER=https://127.0.0.1:15010 MESHLET_CA_FILE=\$PWD/meshlet-ca.crt
  export MESHLET_TOKEN=\$(kubectl --context $CONTEXT -n meshlet exec $CP_POD -- cat /var/lib/meshlet/admin.token)
  meshctl get services                      # https://127.0.0.1:15010/ is the dashboard (log in with that token)

Without the frontend port mapping (another cluster), port-forward it too:
  kubectl --context $CONTEXT port-forward deploy/frontend 8080:15006   # frontend's inbound sidecar

Remove everything: examples/kind/down.sh
TEXT
