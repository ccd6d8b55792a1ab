#!/usr/bin/env bash
# Builds the JobSet controller manager from its Go module (sigs.k8s.io/jobset, pinned in
# go.mod/go.sum here; its main package is the module's root) and copies the module's CRD beside
# it; prints the directory on the last line of stdout (hack/lib/go-controller.sh says what is in
# it and where). go.mod starts from hack/kueue's (Kueue imports JobSet's API at the same
# version), so the two builds share their dependencies' versions and Go's build cache. Bump with:
#   cd hack/jobset && GOTOOLCHAIN=local go get -tool sigs.k8s.io/jobset@vX.Y.Z && go mod tidy
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib/go-controller.sh
source "${HERE}/../lib/go-controller.sh"

build_controller "${HERE}" jobset sigs.k8s.io/jobset jobset.x-k8s.io_jobsets.yaml
