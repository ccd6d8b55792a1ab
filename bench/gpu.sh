#!/usr/bin/env bash
# Set up kubetune on the offline GPU machine (../shared/gpu/README.md), then run "$@".
# The wheels come in .whl/ (../shared/gpu/fetch-wheels.sh); .whl/extra/ holds what the image may
# lack besides (pydantic, pandas, xxhash, ...), installed only when missing; bench/slim_wheels.py
# trims the bitsandbytes wheel to the CUDA 13 libraries so the checkout fits the device's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
site=/tmp/site
if [ ! -e "$site/.kubetune-ready" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  for mod in pydantic:pydantic pandas:pandas xxhash:xxhash fsspec:fsspec dateutil:python_dateutil \
    annotated_types:annotated_types typing_inspection:typing_inspection; do
    if ! python3 -c "import ${mod%%:*}" 2>/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/extra/"${mod##*:}"-*.whl
      [ "${mod%%:*}" = pydantic ] && python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$site" .whl/extra/pydantic_core-*.whl
    fi
  done
  touch "$site/.kubetune-ready"
fi
# The folders map onto kubetune.* (pyproject.toml), as hack/lint.sh links them.
tree=build/gpu
rm -rf "$tree" && mkdir -p "$tree/kubetune"
for pkg in api operator trainer cli local; do ln -s "../../../$pkg" "$tree/kubetune/$pkg"; done
ln -s ../../hack/devtools/kubetune_devtools "$tree/kubetune_devtools"
export PYTHONPATH="$site:$PWD/$tree" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$@"
