# Sourced by hack/kueue/build.sh and hack/jobset/build.sh: a controller manager built from its Go
# module (pinned in the caller's go.mod/go.sum) with the module's CRDs copied beside it.
#
#   build_controller HERE NAME PACKAGE CRD_FILE
#
# HERE holds go.mod/go.sum; PACKAGE is the manager's main package; CRD_FILE one of the CRDs
# (config/components/crd/bases/CRD_FILE) that shows the copy is complete. Prints the directory
# on the last line of stdout:
#
#   <dir>/NAME          the manager
#   <dir>/crds/*.yaml   config/components/crd/bases of the same module version, as published
#
# The directory is ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/NAME/<key>/bin, where <key>
# hashes go.mod and go.sum: the same pin reuses the same build, and a version bump builds next
# to (not over) the old one. The CRDs are not committed: they come from the module cache with
# the binary that serves them, so they cannot drift apart.

log() { echo "build.sh: $*" >&2; }
# shellcheck source=build-once.sh
source "$(dirname "${BASH_SOURCE[0]}")/build-once.sh"

build_controller() {
  _HERE="$1" _NAME="$2" _PACKAGE="$3" _CRD="$4"
  local key root
  key=$(cat "${_HERE}/go.mod" "${_HERE}/go.sum" | sha256sum | cut -c1-16)
  root="${KUBETUNE_CACHE_DIR:-${HOME}/.cache/kubetune}/${_NAME}/${key}"
  build_once "${root}" _controller_present _controller_build
  echo "${root}/bin"
}

_controller_present() { [[ -x "$1/${_NAME}" && -f "$1/crds/${_CRD}" ]]; }

_controller_build() {
  local out="$1"
  # Static, stripped, no VCS stamping; GOTOOLCHAIN=local keeps the build on the installed Go.
  export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
  local start=${SECONDS}
  local module version module_dir
  # `go list` of a package downloads the module if the module cache lacks it.
  module=$(cd "${_HERE}" && go list -f '{{.Module.Path}}' "${_PACKAGE}")
  module_dir=$(cd "${_HERE}" && go list -f '{{.Module.Dir}}' "${_PACKAGE}")
  version=$(cd "${_HERE}" && go list -m -f '{{.Version}}' "${module}")
  # The version stamp both projects' Makefiles set (logged at start, and in their metrics).
  local ldflags="-s -w -X ${module}/pkg/version.GitVersion=${version}"
  log "building ${_NAME} ${version} (cold on 2 cores takes several minutes)"
  (cd "${_HERE}" && go build -trimpath -ldflags="${ldflags}" -buildvcs=false \
    -o "${out}/${_NAME}" "${_PACKAGE}")
  mkdir -p "${out}/crds"
  cp "${module_dir}"/config/components/crd/bases/*.yaml "${out}/crds/"
  # The module cache is read-only; the copies needn't be.
  chmod u+w "${out}"/crds/*.yaml
  log "built in $((SECONDS - start))s"
}
