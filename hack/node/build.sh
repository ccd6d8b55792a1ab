#!/usr/bin/env bash
# Builds a real node for the local cluster from Go modules and prints the directory holding the
# binaries on the last line of stdout.
#
#   kubelet, kube-proxy       k8s.io/kubernetes                    (hack/node/kubernetes)
#   containerd, containerd-shim-runc-v2, ctr
#                             github.com/containerd/containerd/v2  (hack/node/containerd)
#   runc                      github.com/opencontainers/runc       (hack/node/runc; cgo, seccomp)
#   cni/bridge, cni/host-local, cni/loopback, cni/portmap
#                             github.com/containernetworking/plugins (hack/node/cni)
#   pause                     build/pause/linux/pause.c of k8s.io/kubernetes, static
#   coredns                   github.com/coredns/coredns           (hack/node/coredns)
#   kube-router               github.com/cloudnativelabs/kube-router/v2 (hack/node/kube-router;
#                             its NetworkPolicy controller only)
#
# Each part lives under ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/node-<part>/<key>/bin, where
# <key> hashes that part's go.mod/go.sum (and the recipe): the same pins reuse the same binaries,
# a bump of one part rebuilds only that part, and the control plane's cache entry
# (hack/cluster/build.sh) is a different one, so adding the node rebuilds nothing there. The
# printed directory holds links to every part's binaries.
#
# As root on Debian it installs what the node needs from apt: gcc, libc6-dev and pkg-config (runc
# is built with cgo, pause statically), libseccomp-dev (runc's seccomp support; without it every
# sandbox fails to start), iptables (the CNI plugins, kube-proxy), ipset (kube-router's
# policies), iproute2 and util-linux (ip, nsenter, mount: the node's namespaces).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${KUBETUNE_CACHE_DIR:-${HOME}/.cache/kubetune}"
DEBIAN_PACKAGES=(gcc libc6-dev pkg-config libseccomp-dev iptables ipset iproute2 util-linux)

log() { echo "node/build.sh: $*" >&2; }
# shellcheck source=../lib/build-once.sh
source "${HERE}/../lib/build-once.sh"

ensure_packages() {
  local missing=() p
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("${p}")
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing Debian packages: ${missing[*]} (install them as root)"
    exit 1
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q "${missing[@]}" >&2; then
    apt-get update -q >&2
    apt-get install -y -q "${missing[@]}" >&2
  fi
}

# Bump when the build itself changes (flags, stamps), so caches built the old way are not reused.
RECIPE=1

key_of() {
  local dir="$1"
  { echo "recipe ${RECIPE}"; cat "${HERE}/${dir}/go.mod" "${HERE}/${dir}/go.sum"; } \
    | sha256sum | cut -c1-16
}

module_version() { (cd "${HERE}/$1" && go list -m -f '{{.Version}}' "$2"); }

export GOTOOLCHAIN=local GOFLAGS=-mod=mod

# --- kubelet, kube-proxy, pause --------------------------------------------------------------
kubernetes_present() { [[ -x "$1/kubelet" && -x "$1/kube-proxy" && -x "$1/pause" ]]; }
kubernetes_build() {
  local out="$1" start=${SECONDS} version major minor stamp="" pkg module_dir
  version=$(module_version kubernetes k8s.io/kubernetes)
  IFS=. read -r major minor _ <<<"${version#v}"
  # The same stamps as the control plane's (hack/cluster/build.sh): the node reports its version.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=${major}"
    stamp+=" -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
  done
  log "building kubelet and kube-proxy ${version}"
  (cd "${HERE}/kubernetes" && CGO_ENABLED=0 go build -trimpath -ldflags="-s -w${stamp}" \
    -buildvcs=false -o "${out}/" k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
  module_dir=$(cd "${HERE}/kubernetes" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)
  log "building pause from ${module_dir#"${GOMODCACHE:-}"}/build/pause/linux/pause.c"
  gcc -Os -Wall -Werror -static -DVERSION="${version}" -o "${out}/pause" \
    "${module_dir}/build/pause/linux/pause.c"
  strip "${out}/pause"
  log "kubelet, kube-proxy, pause built in $((SECONDS - start))s"
}

# --- containerd ------------------------------------------------------------------------------
containerd_present() {
  [[ -x "$1/containerd" && -x "$1/containerd-shim-runc-v2" && -x "$1/ctr" ]]
}
containerd_build() {
  local out="$1" start=${SECONDS} version module=github.com/containerd/containerd/v2
  version=$(module_version containerd "${module}")
  log "building containerd ${version}"
  # Without cgo and the snapshotters this machine can't use (overlayfs and native stay).
  (cd "${HERE}/containerd" && CGO_ENABLED=0 go build -trimpath -buildvcs=false \
    -tags "no_btrfs no_devmapper no_zfs" \
    -ldflags="-s -w -X ${module}/version.Version=${version} -X ${module}/version.Package=${module}" \
    -o "${out}/" "${module}/cmd/containerd" "${module}/cmd/containerd-shim-runc-v2" \
    "${module}/cmd/ctr")
  log "containerd built in $((SECONDS - start))s"
}

# --- runc ------------------------------------------------------------------------------------
runc_present() { [[ -x "$1/runc" ]]; }
runc_build() {
  local out="$1" start=${SECONDS} version
  version=$(module_version runc github.com/opencontainers/runc)
  log "building runc ${version} (cgo, seccomp)"
  (cd "${HERE}/runc" && CGO_ENABLED=1 go build -trimpath -buildvcs=false -tags seccomp \
    -ldflags="-s -w -X main.version=${version#v}" -o "${out}/runc" github.com/opencontainers/runc)
  log "runc built in $((SECONDS - start))s"
}

# --- CoreDNS (cluster DNS) --------------------------------------------------------------------
coredns_present() { [[ -x "$1/coredns" ]]; }
coredns_build() {
  local out="$1" start=${SECONDS} version module=github.com/coredns/coredns
  version=$(module_version coredns "${module}")
  log "building CoreDNS ${version} (its default plugin set)"
  (cd "${HERE}/coredns" && CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags="-s -w" \
    -o "${out}/coredns" "${module}")
  log "CoreDNS built in $((SECONDS - start))s"
}

# --- kube-router (the NetworkPolicy enforcer only) --------------------------------------------
kube-router_present() { [[ -x "$1/kube-router" ]]; }
kube-router_build() {
  local out="$1" start=${SECONDS} version module=github.com/cloudnativelabs/kube-router/v2
  version=$(module_version kube-router "${module}")
  log "building kube-router ${version}"
  (cd "${HERE}/kube-router" && CGO_ENABLED=0 go build -trimpath -buildvcs=false \
    -ldflags="-s -w -X ${module}/pkg/version.Version=${version}" \
    -o "${out}/kube-router" "${module}/cmd/kube-router")
  log "kube-router built in $((SECONDS - start))s"
}

# --- CNI plugins -----------------------------------------------------------------------------
CNI_PLUGINS=(main/bridge ipam/host-local main/loopback meta/portmap)
cni_present() {
  local p
  for p in "${CNI_PLUGINS[@]}"; do [[ -x "$1/cni/${p#*/}" ]] || return 1; done
}
cni_build() {
  local out="$1" start=${SECONDS} version p module=github.com/containernetworking/plugins
  version=$(module_version cni "${module}")
  log "building CNI plugins ${version}"
  mkdir -p "${out}/cni"
  for p in "${CNI_PLUGINS[@]}"; do
    (cd "${HERE}/cni" && CGO_ENABLED=0 go build -trimpath -buildvcs=false \
      -ldflags="-s -w -X ${module}/pkg/utils/buildversion.BuildVersion=${version}" \
      -o "${out}/cni/${p#*/}" "${module}/plugins/${p}")
  done
  log "CNI plugins built in $((SECONDS - start))s"
}

main() {
  ensure_packages
  local parts=(containerd runc cni kubernetes coredns kube-router) part root links
  links="${CACHE}/node"
  mkdir -p "${links}"
  local dirs=()
  for part in "${parts[@]}"; do
    root="${CACHE}/node-${part}/$(key_of "${part}")"
    build_once "${root}" "${part}_present" "${part}_build"
    dirs+=("${root}/bin")
  done
  # One directory for the caller, named by the parts' keys; its entries link into the parts.
  local key
  key=$(printf '%s\n' "${dirs[@]}" | sha256sum | cut -c1-16)
  local bin="${links}/${key}/bin"
  if [[ ! -d "${bin}" ]]; then
    local tmp="${links}/${key}/bin.tmp.$$"
    rm -rf "${tmp}"
    mkdir -p "${tmp}/cni"
    local d f
    for d in "${dirs[@]}"; do
      for f in "${d}"/*; do
        [[ -d "${f}" ]] && continue
        ln -s "${f}" "${tmp}/"
      done
      if [[ -d "${d}/cni" ]]; then
        for f in "${d}"/cni/*; do ln -s "${f}" "${tmp}/cni/"; done
      fi
    done
    mv -T "${tmp}" "${bin}" 2>/dev/null || rm -rf "${tmp}"
  fi
  echo "${bin}"
}

main "$@"
