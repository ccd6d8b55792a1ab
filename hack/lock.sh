#!/usr/bin/env bash
# Regenerates requirements/*.txt (`make lock`): every Python package the images, `make demo` and
# `make test` install, pinned with its hashes, for the images' platform (CPython 3.11, Linux
# x86_64). operator.txt is the operator image's (operator + server extras: kubetune-server runs
# from the same image); dev.txt (operator + server + trainer + dev extras: the .venv of setup.sh) is resolved first; the
# images' files are resolved within it, so a package has one version everywhere. build.txt pins the
# build backend that turns the project into a wheel. uv keeps the versions already pinned unless
# pyproject.toml needs others (KUBETUNE_LOCK_UPGRADE=1 moves everything to the newest allowed).
# No index URL and no header go into the files: they name packages, versions and hashes only.
# tests/cli/test_lock.py fails when pyproject.toml and these files disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=.venv/bin/uv
common=(--quiet --no-emit-index-url --no-header --generate-hashes
        --python-version 3.11 --python-platform x86_64-unknown-linux-gnu)
[[ "${KUBETUNE_LOCK_UPGRADE:-}" == 1 ]] && common+=(--upgrade)
mkdir -p requirements
"${uv}" pip compile "${common[@]}" pyproject.toml --extra operator --extra server --extra trainer --extra dev \
  -o requirements/dev.txt
"${uv}" pip compile "${common[@]}" pyproject.toml --extra operator --extra server -c requirements/dev.txt \
  -o requirements/operator.txt
"${uv}" pip compile "${common[@]}" pyproject.toml --extra trainer -c requirements/dev.txt \
  -o requirements/trainer.txt
python_build=$(sed -n '/^\[build-system\]/,/^\[/s/^requires = \[\(.*\)\]/\1/p' pyproject.toml | tr -d '" ' | tr ',' '\n')
"${uv}" pip compile "${common[@]}" - -c requirements/dev.txt -o requirements/build.txt <<<"${python_build}"
if grep -r -i -E -l "https?://" requirements/; then
  echo "lock: a URL is in the files above; they must name no package index" >&2
  exit 1
fi
