#!/usr/bin/env bash
# Installs the headless browser the console's tests drive (tests/server/test_console_browser.py):
# Debian's chromium and its chromedriver, from apt, idempotently. Selenium talks to that
# chromedriver directly (no driver or browser is downloaded at test time). Prints the chromium
# binary's path on the last line of stdout.
set -euo pipefail

PACKAGES=(chromium chromium-driver)
log() { echo "browser/install.sh: $*" >&2; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q 'install ok installed' || missing+=("${p}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})"
    exit 1
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt=(apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends)
  if ! "${apt[@]}" "${missing[@]}" >&2; then
    apt-get -o DPkg::Lock::Timeout=600 update -q >&2
    "${apt[@]}" "${missing[@]}" >&2
  fi
fi
command -v chromium
