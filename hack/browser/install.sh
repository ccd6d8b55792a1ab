#!/usr/bin/env bash
# Installs the headless browser the console's tests drive (tests/server/test_console_browser.py):
# Debian's chromium and its chromedriver, from apt, idempotently. Selenium talks to that
# chromedriver directly (no driver or browser is downloaded at test time). Prints the chromium
# binary's path on the last line of stdout.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "browser/install.sh: $*" >&2; }
# shellcheck source=../lib/debian-packages.sh
source "${HERE}/../lib/debian-packages.sh"

ensure_debian_packages chromium chromium-driver
command -v chromium
