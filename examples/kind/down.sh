#!/usr/bin/env bash
# Deletes the kind cluster that examples/kind/up.sh created (name meshlet)
# and everything in it. The images stay in docker (docker image rm
# meshlet/sidecar:VERSION ... to remove them).
set -euo pipefail

CLUSTER=meshlet # the name in manifests/kind/cluster.yaml

if ! command -v kind >/dev/null 2>&1; then
  echo "error: kind is not installed (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)" >&2
  exit 1
fi
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind delete cluster --name "$CLUSTER"
else
  echo "no kind cluster named $CLUSTER; nothing to delete"
fi
