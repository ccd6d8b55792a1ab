#!/usr/bin/env bash
# Builds kubetune's two images from the Dockerfile (and, when a test asks for the target
# trainer-test, the tests' image FROM the trainer's: hack/images/test/Containerfile) with buildah (no daemon, no registry) and puts
# them where the local node runs images from. `make images` calls it; so do the tests that need
# the images (through kubetune_devtools.pytest_plugin). It prints the image store on its last line.
#
#   base   python:3.11-slim-bookworm, which can't be pulled here, is stood in for by an image made
#          from Debian's packages with mmdebstrap (bookworm's Python is 3.11 too), tagged with the
#          name the Dockerfile uses; buildah then builds with --pull=never.
#   build  buildah bud --target operator / --target trainer; the Dockerfile's uv cache mount is
#          uv's own cache (torch and its CUDA wheels are GBs: the first build reuses what
#          `make setup` downloaded); the host's CA bundle is passed as the build secret `ca-bundle` (a
#          TLS-intercepting proxy's CA), never written into a layer. After each build the images
#          no built image descends from are pruned; the stages' own layers stay as the layer cache.
#   store  each image's layers laid out as one root filesystem of hard links to buildah's own
#          layer files (store.py: no copy, seconds for the trainer's 5 GB), with an OCI layout of
#          its index, manifest and config, in
#          ${KUBETUNE_CACHE_DIR:-~/.cache/kubetune}/images/store/<escaped name:tag>/{oci,bundle/rootfs}
#          (local/images.py reads it).
#
# KUBETUNE_IMAGES_REUSE=1 uses what the store holds, stale or not (for iterating on tests while
# the sources change; never in CI). Everything else is keyed by content: the base by its recipe (this file's base section), each image by
# the Dockerfile, .dockerignore, the files the build context admits and the base's key. A build
# whose key is already in the store is skipped; buildah's layer cache makes a partly changed
# build cheap (a source change rebuilds the project's install step only, not the pinned
# dependencies' layer).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
CACHE="${KUBETUNE_CACHE_DIR:-${HOME}/.cache/kubetune}/images"
STORE="${CACHE}/store"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "${REPO}/pyproject.toml" | head -n1)"
TARGETS=(${KUBETUNE_IMAGE_TARGETS:-operator trainer})
PYTHON_IMAGE=python:3.11-slim-bookworm
# Debian packages of the stand-in base: what python:3.11-slim-bookworm offers the Dockerfile.
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,passwd
CA_BUNDLE="${KUBETUNE_BUILD_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"

log() { echo "images: $*" >&2; }

ensure_tools() {
  local missing=() tool
  for tool in buildah mmdebstrap; do
    command -v "${tool}" >/dev/null 2>&1 || missing+=("${tool}")
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing ${missing[*]}: install the Debian packages buildah and mmdebstrap"
    exit 1
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q buildah mmdebstrap >&2; then
    apt-get update -q >&2
    apt-get install -y -q buildah mmdebstrap >&2
  fi
}

bah() {
  buildah --root "${CACHE}/buildah/root" --runroot "${CACHE}/buildah/run" \
    --storage-driver overlay --storage-opt overlay.skip_mount_home=true "$@"
}

sources_list() {
  # The host's own Debian sources: mmdebstrap fetches from wherever this machine's apt does.
  local f
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [[ -s "${f}" ]] && { echo "${f}"; return; }
  done
  log "no Debian sources list found under /etc/apt"
  exit 1
}

base_key() {
  { echo "bookworm minbase ${BASE_PACKAGES}"; sed -n '/^base_image()/,/^}/p' "${HERE}/build.sh"; } \
    | sha256sum | cut -c1-16
}

base_image() {
  local key="$1" tar ctr
  if [[ "$(bah inspect --type image --format '{{index .ImageAnnotations "io.kubetune.base-key"}}' \
        "${PYTHON_IMAGE}" 2>/dev/null)" == "${key}" ]]; then
    log "reusing the stand-in ${PYTHON_IMAGE} (${key})"
    return
  fi
  log "making the stand-in ${PYTHON_IMAGE} from Debian packages (mmdebstrap)"
  tar="${CACHE}/tmp/base-${key}.tar"
  mkdir -p "${CACHE}/tmp"
  SOURCE_DATE_EPOCH=1700000000 mmdebstrap --quiet --variant=minbase \
    --include="${BASE_PACKAGES}" --dpkgopt=path-exclude=/usr/share/doc/* \
    --dpkgopt=path-exclude=/usr/share/man/* --dpkgopt=path-exclude=/usr/share/locale/* \
    bookworm "${tar}" "$(sources_list)" >&2
  ctr="$(bah from scratch)"
  bah add --quiet "${ctr}" "${tar}" / >&2
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' --annotation "io.kubetune.base-key=${key}" "${ctr}"
  bah commit --quiet --rm "${ctr}" "${PYTHON_IMAGE}" >/dev/null
  rm -f "${tar}"
}

context_key() {
  local base="$1"
  cd "${REPO}"
  {
    echo "${base}"
    sed -n '/^build_target()/,/^}/p' "${HERE}/build.sh"
    sha256sum Dockerfile .dockerignore
    find pyproject.toml README.md requirements api operator trainer cli \
      local server -type f ! -path '*/__pycache__/*' ! -name '*.py[co]' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}

uv_cache_mount() {
  # buildah (1.28) keeps `RUN --mount=type=cache,id=ID` under $TMPDIR/buildah-cache/ID: point the
  # Dockerfile's kubetune-uv cache at uv's own, so the wheels `make setup` fetched (torch and its
  # CUDA libraries: GBs) aren't fetched again.
  local uv_cache="${UV_CACHE_DIR:-${HOME}/.cache/uv}" parent="${CACHE}/tmp/buildah-cache"
  mkdir -p "${uv_cache}" "${parent}"
  [[ -L "${parent}/kubetune-uv" ]] || rm -rf "${parent}/kubetune-uv"
  ln -sfn "${uv_cache}" "${parent}/kubetune-uv"
}

store_dir() {
  echo "${STORE}/$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1")"
}

stored() {
  [[ "$(cat "$(store_dir "kubetune/$1:${VERSION}")/key" 2>/dev/null)" == "$2" ]]
}

test_key() {
  # trainer-test (hack/images/test/Containerfile): the trainer's key, the Containerfile and the
  # devtools package it adds.
  cd "${REPO}"
  {
    echo "$1"
    sha256sum hack/images/test/Containerfile hack/devtools/.dockerignore
    find hack/devtools/kubetune_devtools -type f ! -path '*/__pycache__/*' ! -name '*.py[co]' \
      -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
}

target_key() {
  # The key a target is stored under: the build context's, or for the test image its own.
  if [[ "$1" == trainer-test ]]; then test_key "$2"; else echo "$2"; fi
}

build_target() {
  local target="$1" key="$2" ref="kubetune/$1:${VERSION}" dir
  dir="$(store_dir "${ref}")"
  if stored "${target}" "${key}"; then
    log "reusing ${ref} (${key})"
    return
  fi
  local start=${SECONDS} secret=()
  [[ -s "${CA_BUNDLE}" ]] && secret=(--secret "id=ca-bundle,src=${CA_BUNDLE}")
  log "building ${ref}"
  if [[ "${target}" == trainer-test ]]; then
    # FROM the trainer image this run stored (or reused): built before it, see main.
    TMPDIR="${CACHE}/tmp" bah bud --quiet --isolation chroot --pull=never --layers \
      --build-arg "BASE=kubetune/trainer:${VERSION}" --tag "${ref}" \
      --file "${HERE}/test/Containerfile" "${REPO}/hack/devtools" >&2
  else
    TMPDIR="${CACHE}/tmp" bah bud --quiet --isolation chroot --pull=never --layers \
      --target "${target}" "${secret[@]}" --tag "${ref}" --file "${REPO}/Dockerfile" "${REPO}" >&2
  fi
  local built=${SECONDS} id
  log "storing ${ref}"
  local tmp="${dir}.tmp.$$"
  rm -rf "${tmp}"
  id="$(bah images --noheading --no-trunc --format '{{.ID}}' "${ref}" | head -n1)"
  python3 "${HERE}/store.py" "${CACHE}/buildah/root" "${id#sha256:}" "${VERSION}" "${tmp}"
  echo "${ref}" >"${tmp}/name"
  echo "${key}" >"${tmp}/key"
  rm -rf "${dir}"
  mv "${tmp}" "${dir}"
  log "${ref}: $(du -sh --apparent-size "${dir}/bundle/rootfs" | cut -f1) unpacked, $((SECONDS - start))s" \
    "(build $((built - start))s, store $((SECONDS - built))s)"
}

main() {
  local base target key
  base="$(base_key)"
  key="$(context_key "${base}")"
  # The test image is built FROM the trainer's: that goes first.
  if [[ " ${TARGETS[*]} " == *" trainer-test "* && " ${TARGETS[*]} " != *" trainer "* ]]; then
    TARGETS=(trainer "${TARGETS[@]}")
  fi
  # Already built: no tools, no lock, at once.
  for target in "${TARGETS[@]}"; do
    if [[ "${KUBETUNE_IMAGES_REUSE:-}" == 1 && -f "$(store_dir "kubetune/${target}:${VERSION}")/key" ]]; then
      log "KUBETUNE_IMAGES_REUSE=1: using the stored kubetune/${target}:${VERSION} as it is"
    else
      stored "${target}" "$(target_key "${target}" "${key}")" || break
    fi
    [[ "${target}" == "${TARGETS[-1]}" ]] && { echo "${STORE}"; return; }
  done
  ensure_tools
  mkdir -p "${STORE}" "${CACHE}/tmp"
  exec 9>"${CACHE}/.lock"
  flock 9
  uv_cache_mount
  base_image "${base}"
  for target in "${TARGETS[@]}"; do
    build_target "${target}" "$(target_key "${target}" "${key}")"
  done
  bah rm --all >/dev/null 2>&1 || true
  bah rmi --prune >/dev/null 2>&1 || true
  echo "${STORE}"
}

main "$@"
