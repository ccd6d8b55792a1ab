#!/usr/bin/env bash
# Builds the local cluster's control plane from Go modules and prints the
# directory holding the binaries on the last line of stdout.
#
#   etcd                      go.etcd.io/etcd/server/v3      (hack/cluster/etcd)
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
#                             k8s.io/kubernetes              (hack/cluster/kubernetes)
#
# The output lives under ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/cluster/<key>/bin,
# where <key> hashes the committed go.mod/go.sum files: the same pins reuse the
# same binaries, and a version bump builds next to (not over) the old ones.
# A cold build compiles all of Kubernetes; keep GOCACHE/GOMODCACHE between CI
# runs to make even a changed pin cheap.
#
# It also makes sure bubblewrap (bwrap) is present, which Kueue's and JobSet's managers run in
# (docs/local-cluster.md); on Debian as root it installs the package.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)

log() { echo "build.sh: $*" >&2; }
# shellcheck source=../lib/build-once.sh
source "${HERE}/../lib/build-once.sh"

ensure_bwrap() {
  if command -v bwrap >/dev/null 2>&1; then
    return
  fi
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "bwrap not found; install bubblewrap (Debian package 'bubblewrap')"
    exit 1
  fi
  log "installing bubblewrap"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q bubblewrap >&2; then
    apt-get update -q >&2
    apt-get install -y -q bubblewrap >&2
  fi
}

# Bump when the build itself changes (flags, stamps), so caches built the old way are not reused.
RECIPE=2  # 2: Kubernetes binaries stamped with their version

cache_key() {
  { echo "recipe ${RECIPE}"; cat "${HERE}"/kubernetes/go.mod "${HERE}"/kubernetes/go.sum \
    "${HERE}"/etcd/go.mod "${HERE}"/etcd/go.sum; } | sha256sum | cut -c1-16
}

all_present() {
  local dir="$1" b
  for b in "${BINARIES[@]}"; do
    [[ -x "${dir}/${b}" ]] || return 1
  done
}

build() {
  local out="$1"
  # Static binaries, no debug info, no VCS stamping: the fastest build that
  # still runs everywhere. GOTOOLCHAIN=local keeps the build on the installed Go.
  export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
  local flags=(-trimpath -ldflags=-s\ -w -buildvcs=false)
  local start=${SECONDS}
  log "building etcd"
  (cd "${HERE}/etcd" && go build "${flags[@]}" -o "${out}/etcd" go.etcd.io/etcd/server/v3)
  # The version stamps Kubernetes' own build sets (hack/lib/version.sh): without them the
  # apiserver's /version says v0.0.0-master, which clients that check it (Kueue) can't parse.
  local version major minor
  version=$(cd "${HERE}/kubernetes" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
  IFS=. read -r major minor _ <<<"${version#v}"
  local stamp="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=${major}"
    stamp+=" -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
  done
  log "building kubernetes ${version} components (the slow part; cold on 2 cores takes a while)"
  (cd "${HERE}/kubernetes" && go build -trimpath -ldflags="-s -w${stamp}" -buildvcs=false \
    -o "${out}/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl)
  log "built in $((SECONDS - start))s"
}

main() {
  ensure_bwrap
  local root="${KUBETUNE_CACHE_DIR:-${HOME}/.cache/kubetune}/cluster/$(cache_key)"
  build_once "${root}" all_present build
  echo "${root}/bin"
}

main "$@"
