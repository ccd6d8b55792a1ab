#!/usr/bin/env bash
# The CRDs of the serving stacks `kubetune serve-manifest` writes for, for the tests that apply its
# manifests to a real apiserver (tests/cli/test_serve_manifest.py). Prints their directory on the
# last line of stdout:
#
#   <dir>/llminferenceservices.serving.kserve.io.yaml   KServe's LLMInferenceService, taken from
#       the zip of the Go module github.com/kserve/kserve at KSERVE_VERSION (through the Go module
#       proxy, checked against KSERVE_SUM), config/crd/minimal/llmisvc/
#   <dir>/workspaces.kaito.sh.yaml                      KAITO's Workspace, from the copy beside
#       this script (its header says why it is a copy)
#
# The directory is ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/serving-crds/<key>/bin, where <key>
# hashes this script and the KAITO copy: the same pins reuse the same files. Bump KServe by setting
# KSERVE_VERSION and KSERVE_SUM (the "Sum" that `go mod download -json` prints).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KSERVE_MODULE=github.com/kserve/kserve
KSERVE_VERSION=v0.17.0
KSERVE_SUM="h1:IaynaBFzVQz1Xyrw5n3ncqzd5Y7L1RkO+YWvVwwtMQE="
KSERVE_CRD=config/crd/minimal/llmisvc/serving.kserve.io_llminferenceservices.yaml

log() { echo "fetch.sh: $*" >&2; }
# shellcheck source=../lib/build-once.sh
source "${HERE}/../lib/build-once.sh"

fetch() {
  local out="$1" info dir sum
  log "downloading ${KSERVE_MODULE}@${KSERVE_VERSION} (its module zip, once)"
  # Outside any module, so no go.mod here has to name it; GOTOOLCHAIN=local keeps the installed Go.
  info=$(cd "${out}" && GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json \
    "${KSERVE_MODULE}@${KSERVE_VERSION}")
  dir=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])' <<<"${info}")
  sum=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["Sum"])' <<<"${info}")
  if [[ "${sum}" != "${KSERVE_SUM}" ]]; then
    log "${KSERVE_MODULE}@${KSERVE_VERSION} hashes to ${sum}, not the pinned ${KSERVE_SUM}"
    return 1
  fi
  cp "${dir}/${KSERVE_CRD}" "${out}/llminferenceservices.serving.kserve.io.yaml"
  cp "${HERE}/kaito.sh_workspaces.yaml" "${out}/workspaces.kaito.sh.yaml"
  chmod u+w "${out}"/*.yaml
}

present() {
  [[ -s "$1/llminferenceservices.serving.kserve.io.yaml" && -s "$1/workspaces.kaito.sh.yaml" ]]
}

main() {
  local key
  key=$(cat "${BASH_SOURCE[0]}" "${HERE}/kaito.sh_workspaces.yaml" | sha256sum | cut -c1-16)
  local root="${KUBETUNE_CACHE_DIR:-${HOME}/.cache/kubetune}/serving-crds/${key}"
  build_once "${root}" present fetch
  echo "${root}/bin"
}

main "$@"
