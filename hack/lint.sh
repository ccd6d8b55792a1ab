#!/usr/bin/env bash
# Lint, format check, strict typing and the import layers.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
# The folders map onto kubetune.* (pyproject.toml); mypy can't follow setuptools' editable import
# hook, so it reads the same files through a tree of links shaped like the installed package.
tree=build/typecheck
rm -rf "$tree" && mkdir -p "$tree/kubetune"
for pkg in api operator trainer cli local server; do ln -s "../../../$pkg" "$tree/kubetune/$pkg"; done
ln -s ../../hack/devtools/kubetune_devtools "$tree/kubetune_devtools"
MYPYPATH=$tree .venv/bin/mypy -p kubetune.api -p kubetune.operator -p kubetune.trainer \
  -p kubetune.cli -p kubetune.local -p kubetune.server -p kubetune_devtools
echo "==> import layers"
PYTHONPATH=$tree .venv/bin/lint-imports
