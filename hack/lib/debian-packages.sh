# Sourced by hack/browser/install.sh and hack/registry/build.sh: Debian packages a step needs,
# installed from apt when missing (as root; otherwise the step says what to install).
#
#   ensure_debian_packages PACKAGE...

ensure_debian_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q 'install ok installed' || missing+=("${p}")
  done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})"
    exit 1
  fi
  log "installing ${missing[*]}"
  local apt=(apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends)
  if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}" >&2; then
    apt-get -o DPkg::Lock::Timeout=600 update -q >&2
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}" >&2
  fi
}
