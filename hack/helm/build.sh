#!/usr/bin/env bash
# Builds the helm CLI from its Go module (helm.sh/helm/v3, pinned in go.mod/go.sum here) and
# prints the path of the binary on the last line of stdout.
#
# The binary lives at ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/helm/<key>/bin/helm, where
# <key> hashes go.mod and go.sum: the same pins reuse the same binary, and a version bump builds
# next to (not over) the old one. Bump with:
#   cd hack/helm && GOTOOLCHAIN=local go get -tool helm.sh/helm/v3/cmd/helm@vX.Y.Z && go mod tidy
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "build.sh: $*" >&2; }
# shellcheck source=../lib/build-once.sh
source "${HERE}/../lib/build-once.sh"

cache_key() {
  cat "${HERE}/go.mod" "${HERE}/go.sum" | sha256sum | cut -c1-16
}

build() {
  local out="$1"
  # Static, stripped, no VCS stamping; GOTOOLCHAIN=local keeps the build on the installed Go.
  export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
  local start=${SECONDS}
  # The version stamps helm's own Makefile sets: `helm version`, and the Kubernetes version that
  # `helm template`/`helm lint` assume (the client-go minor, as 0.37 -> 1.37).
  local helm_version client_go major minor
  helm_version=$(cd "${HERE}" && go list -m -f '{{.Version}}' helm.sh/helm/v3)
  client_go=$(cd "${HERE}" && go list -m -f '{{.Version}}' k8s.io/client-go)
  IFS=. read -r major minor _ <<<"${client_go#v}"
  major=$((major + 1))
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${helm_version}"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  local pkg
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X ${pkg}.k8sVersionMajor=${major} -X ${pkg}.k8sVersionMinor=${minor}"
  done
  log "building helm ${helm_version} (cold on 2 cores takes a few minutes)"
  (cd "${HERE}" && go build -trimpath -ldflags="${ldflags}" -buildvcs=false -o "${out}/helm" \
    helm.sh/helm/v3/cmd/helm)
  log "built in $((SECONDS - start))s"
}

helm_present() { [[ -x "$1/helm" ]]; }

main() {
  local root="${KUBETUNE_CACHE_DIR:-${HOME}/.cache/kubetune}/helm/$(cache_key)"
  build_once "${root}" helm_present build
  echo "${root}/bin/helm"
}

main "$@"
