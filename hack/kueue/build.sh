#!/usr/bin/env bash
# Builds the Kueue manager from its Go module (sigs.k8s.io/kueue, pinned in go.mod/go.sum here)
# and copies the module's CRDs beside it; prints the directory on the last line of stdout:
#
#   <dir>/kueue         the manager (sigs.k8s.io/kueue/cmd/kueue)
#   <dir>/crds/*.yaml   config/components/crd/bases of the same module version, as published
#
# The directory is ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/kueue/<key>/bin, where <key>
# hashes go.mod and go.sum: the same pin reuses the same build, and a version bump builds next
# to (not over) the old one. The CRDs are not committed: they come from the module cache with
# the binary that serves them, so they cannot drift apart. Bump with:
#   cd hack/kueue && GOTOOLCHAIN=local go get -tool sigs.k8s.io/kueue/cmd/kueue@vX.Y.Z && go mod tidy
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
  local version module_dir
  version=$(cd "${HERE}" && go list -m -f '{{.Version}}' sigs.k8s.io/kueue)
  # `go list` of a package downloads the module if the module cache lacks it.
  module_dir=$(cd "${HERE}" && go list -f '{{.Module.Dir}}' sigs.k8s.io/kueue/cmd/kueue)
  # The version stamp Kueue's own Makefile sets (logged at start, and in its metrics).
  local ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=${version}"
  log "building kueue ${version} (cold on 2 cores takes several minutes)"
  (cd "${HERE}" && go build -trimpath -ldflags="${ldflags}" -buildvcs=false -o "${out}/kueue" \
    sigs.k8s.io/kueue/cmd/kueue)
  mkdir -p "${out}/crds"
  cp "${module_dir}"/config/components/crd/bases/*.yaml "${out}/crds/"
  # The module cache is read-only; the copies needn't be.
  chmod u+w "${out}"/crds/*.yaml
  log "built in $((SECONDS - start))s"
}

kueue_present() { [[ -x "$1/kueue" && -f "$1/crds/kueue.x-k8s.io_clusterqueues.yaml" ]]; }

main() {
  local root="${KUBETUNE_CACHE_DIR:-${HOME}/.cache/kubetune}/kueue/$(cache_key)"
  build_once "${root}" kueue_present build
  echo "${root}/bin"
}

main "$@"
