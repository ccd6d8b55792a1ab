#!/usr/bin/env bash
# Builds an OCI registry (distribution's `registry`, github.com/distribution/distribution/v3) and
# the `oras` CLI (oras.land/oras) from their Go modules, pinned in go.mod/go.sum here, and prints
# their directory on the last line of stdout:
#
#   <dir>/registry   the registry the local cluster and the tests push adapters to
#   <dir>/oras       an independent OCI client the tests pull them back with
#
# and makes sure Debian's skopeo is installed: KAITO's adapter puller runs skopeo, and the tests
# take a KAITO-layout adapter image apart with the same commands.
#
# The directory is ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/registry/<key>/bin, where <key>
# hashes go.mod and go.sum: the same pins reuse the same build, and a version bump builds next
# to (not over) the old one. Bump with:
#   cd hack/registry && GOTOOLCHAIN=local go get -tool \
#     github.com/distribution/distribution/v3/cmd/registry@vX.Y.Z oras.land/oras/cmd/oras@vX.Y.Z \
#     && go mod tidy
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "build.sh: $*" >&2; }
# shellcheck source=../lib/build-once.sh
source "${HERE}/../lib/build-once.sh"
# shellcheck source=../lib/debian-packages.sh
source "${HERE}/../lib/debian-packages.sh"

build() {
  local out="$1"
  # Static, stripped, no VCS stamping; GOTOOLCHAIN=local keeps the build on the installed Go.
  export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
  local start=${SECONDS}
  local registry_version oras_version
  registry_version=$(cd "${HERE}" && go list -m -f '{{.Version}}' github.com/distribution/distribution/v3)
  oras_version=$(cd "${HERE}" && go list -m -f '{{.Version}}' oras.land/oras)
  # The registry's Makefile stamps its version (`registry --version`); oras's is in its source.
  log "building registry ${registry_version} and oras ${oras_version} (cold on 2 cores: minutes)"
  (cd "${HERE}" && go build -trimpath -buildvcs=false -o "${out}/registry" \
    -ldflags="-s -w -X github.com/distribution/distribution/v3/version.version=${registry_version}" \
    github.com/distribution/distribution/v3/cmd/registry)
  log "registry built in $((SECONDS - start))s"
  (cd "${HERE}" && go build -trimpath -buildvcs=false -o "${out}/oras" \
    -ldflags="-s -w" \
    oras.land/oras/cmd/oras)
  log "built in $((SECONDS - start))s"
}

present() { [[ -x "$1/registry" && -x "$1/oras" ]]; }

main() {
  ensure_debian_packages skopeo
  local key
  key=$(cat "${HERE}/go.mod" "${HERE}/go.sum" | sha256sum | cut -c1-16)
  local root="${KUBETUNE_CACHE_DIR:-${HOME}/.cache/kubetune}/registry/${key}"
  build_once "${root}" present build
  echo "${root}/bin"
}

main "$@"
