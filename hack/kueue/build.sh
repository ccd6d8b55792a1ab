#!/usr/bin/env bash
# Builds the Kueue manager from its Go module (sigs.k8s.io/kueue, pinned in go.mod/go.sum here)
# and copies the module's CRDs beside it; prints the directory on the last line of stdout
# (hack/lib/go-controller.sh says what is in it and where). Bump with:
#   cd hack/kueue && GOTOOLCHAIN=local go get -tool sigs.k8s.io/kueue/cmd/kueue@vX.Y.Z && go mod tidy
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/go-controller.sh
source "${HERE}/../lib/go-controller.sh"

build_controller "${HERE}" kueue sigs.k8s.io/kueue/cmd/kueue kueue.x-k8s.io_clusterqueues.yaml
