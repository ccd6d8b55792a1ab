#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently: a virtualenv with kubetune and
# its extras at the versions pinned in requirements/dev.txt (`make lock`; through uv, with its
# download cache and the pinned hashes), Debian's bubblewrap, and the Kubernetes control-plane
# binaries, the real node's (kubelet, containerd, runc, CNI plugins; hack/node/build.sh, which
# installs libseccomp-dev and iptables) (and the Kueue and JobSet managers, for queued jobs and JobSet groups) built from Go
# modules into a cache keyed by their go.sum. The images (`make images`, hack/images/build.sh) are built by `make test` before pytest
# (and by the tests that run them, on first use), cached by content.
set -euo pipefail
cd "$(dirname "$0")/.."
# The folder operator/ would shadow the standard library module if the cwd were on sys.path.
export PYTHONSAFEPATH=1

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
if [ ! -x .venv/bin/uv ]; then
  .venv/bin/python -m pip install -q uv
fi
# uv itself at the version pyproject.toml's [tool.uv] requires (it also writes requirements/).
uv_version=$(sed -n 's/^required-version = "==\(.*\)"/\1/p' pyproject.toml)
if [ "$(.venv/bin/uv --version | cut -d' ' -f2)" != "$uv_version" ]; then
  .venv/bin/python -m pip install -q "uv==$uv_version"
fi
stamp=.venv/.kubetune-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/dev.txt -nt "$stamp" ] \
   || [ hack/devtools/pyproject.toml -nt "$stamp" ]; then
  echo "==> installing the pinned requirements/dev.txt, kubetune and kubetune-devtools into .venv"
  .venv/bin/uv pip install -q --python .venv/bin/python --require-hashes -r requirements/dev.txt
  .venv/bin/uv pip install -q --python .venv/bin/python --no-deps \
    --build-constraint requirements/build.txt -e . -e hack/devtools
  touch "$stamp"
fi

echo "==> control plane, the real node, helm, Kueue and JobSet from Go modules (cached after the first build)"
bash hack/cluster/build.sh >/dev/null
# After the control plane: kubelet shares most of its packages, found in Go's build cache.
bash hack/node/build.sh >/dev/null
bash hack/helm/build.sh >/dev/null
bash hack/kueue/build.sh >/dev/null
bash hack/jobset/build.sh >/dev/null
