#!/usr/bin/env bash
# Builds hack/loadgen (the Go load generator bench/server_latency.py drives kubetune-server with;
# the standard library only, so go.mod pins the language version and there is no go.sum) and
# prints the binary's path on the last line of stdout. Only the bench calls it; make test doesn't.
#
# The binary is ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/loadgen/<key>/bin/loadgen, where
# <key> hashes go.mod and main.go: the same source reuses the same build.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "build.sh: $*" >&2; }
# shellcheck source=../lib/build-once.sh
source "${HERE}/../lib/build-once.sh"

build() {
  # Static, stripped, no VCS stamping; GOTOOLCHAIN=local keeps the build on the installed Go.
  (cd "${HERE}" && CGO_ENABLED=0 GOTOOLCHAIN=local go build -trimpath -buildvcs=false \
    -ldflags="-s -w" -o "$1/loadgen" .)
}

present() { [[ -x "$1/loadgen" ]]; }

main() {
  local key
  key=$(cat "${HERE}/go.mod" "${HERE}/main.go" | sha256sum | cut -c1-16)
  local root="${KUBETUNE_CACHE_DIR:-${HOME}/.cache/kubetune}/loadgen/${key}"
  build_once "${root}" present build
  echo "${root}/bin/loadgen"
}

main "$@"
