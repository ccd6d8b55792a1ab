# Sourced by hack/cluster/build.sh, hack/helm/build.sh and hack/lib/go-controller.sh: build
# binaries once into a cache directory, safely when several callers race.
#
#   build_once ROOT PRESENT_FN BUILD_FN
#
# PRESENT_FN DIR succeeds when DIR holds every binary; BUILD_FN DIR builds them into DIR.
# The result is ROOT/bin, built in a temporary directory and moved into place, so an
# interrupted build never looks finished.

build_once() {
  local root="$1" present="$2" build_fn="$3"
  local bin="${root}/bin"
  mkdir -p "${root}"
  if "${present}" "${bin}"; then
    log "reusing ${bin}"
    return
  fi
  # One builder at a time; a second caller waits and then finds the result.
  exec 9>"${root}/.lock"
  flock 9
  if ! "${present}" "${bin}"; then
    local tmp="${root}/bin.tmp.$$"
    rm -rf "${tmp}"
    mkdir -p "${tmp}"
    "${build_fn}" "${tmp}"
    rm -rf "${bin}"
    mv "${tmp}" "${bin}"
  fi
}
