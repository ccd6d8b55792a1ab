#!/usr/bin/env bash
# Every test the README promises: unit, trainer (real 4-bit on the CPU), integration and e2e
# (on the real local control plane). gpu tests are skipped here and reported as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
exec .venv/bin/pytest "$@"
