#!/usr/bin/env bash
# Builds the JobSet controller manager from its Go module (sigs.k8s.io/jobset, pinned in
# go.mod/go.sum here) and copies the module's CRD beside it; prints the directory on the last
# line of stdout:
#
#   <dir>/jobset        the manager (sigs.k8s.io/jobset: its main package is the module's root)
#   <dir>/crds/*.yaml   config/components/crd/bases of the same module version, as published
#
# The directory is ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/jobset/<key>/bin, where <key>
# hashes go.mod and go.sum: the same pin reuses the same build, and a version bump builds next
# to (not over) the old one. go.mod starts from hack/kueue's (Kueue imports JobSet's API at the
# same version), so the two builds share their dependencies' versions and Go's build cache.
# Bump with:
#   cd hack/jobset && GOTOOLCHAIN=local go get -tool sigs.k8s.io/jobset@vX.Y.Z && go mod tidy
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
  version=$(cd "${HERE}" && go list -m -f '{{.Version}}' sigs.k8s.io/jobset)
  # `go list` of a package downloads the module if the module cache lacks it.
  module_dir=$(cd "${HERE}" && go list -f '{{.Module.Dir}}' sigs.k8s.io/jobset)
  # The version stamp JobSet's own Makefile sets (logged at start).
  local ldflags="-s -w -X sigs.k8s.io/jobset/pkg/version.GitVersion=${version}"
  log "building jobset ${version}"
  (cd "${HERE}" && go build -trimpath -ldflags="${ldflags}" -buildvcs=false -o "${out}/jobset" \
    sigs.k8s.io/jobset)
  mkdir -p "${out}/crds"
  cp "${module_dir}"/config/components/crd/bases/*.yaml "${out}/crds/"
  # The module cache is read-only; the copies needn't be.
  chmod u+w "${out}"/crds/*.yaml
  log "built in $((SECONDS - start))s"
}

jobset_present() { [[ -x "$1/jobset" && -f "$1/crds/jobset.x-k8s.io_jobsets.yaml" ]]; }

main() {
  local root="${KUBETUNE_CACHE_DIR:-${HOME}/.cache/kubetune}/jobset/$(cache_key)"
  build_once "${root}" jobset_present build
  echo "${root}/bin"
}

main "$@"
