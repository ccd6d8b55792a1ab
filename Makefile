# The two commands a newcomer needs: `make demo` and `make test`. See README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export PYTHONSAFEPATH := 1

.PHONY: help setup demo demo-down test lint unit crds docs images lock chart

help:
	@echo "make demo   set everything up and run the tiny fine-tuning job end to end"
	@echo "make test   install what the tests need, build the images, then lint, type-check and run every test"
	@echo "make crds   regenerate crds/ from the API models"
	@echo "make docs   regenerate the module tables in docs/ from the modules' docstrings"
	@echo "make images build the operator and trainer images from the Dockerfile (buildah, cached)"
	@echo "make lock   re-pin requirements/*.txt after a change to pyproject.toml's dependencies"
	@echo "make chart  package the Helm chart into build/chart (helm push it to oci://<registry>/<path>)"

setup:
	@bash hack/setup.sh

demo: setup
	@bash hack/demo.sh

demo-down:
	@.venv/bin/kubetune local down

lint: setup
	@bash hack/lint.sh

# The real node's binaries (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS, kube-router;
# hack/node/build.sh installs their Debian packages), Kueue's and JobSet's managers, the OCI
# registry and oras (none of which the demo starts), Debian's chromium and chromedriver for the
# console's browser tests (hack/browser/install.sh) and the images first, outside
# pytest's per-test timeout (each is minutes when cold).
test: setup
	@bash hack/lint.sh
	@echo "==> the real node, Kueue, JobSet, the registry and oras from Go modules (cached after the first build)"
	@bash hack/node/build.sh >/dev/null
	@bash hack/kueue/build.sh >/dev/null
	@bash hack/jobset/build.sh >/dev/null
	@bash hack/registry/build.sh >/dev/null
	@echo "==> KServe's and KAITO's CRDs for the serving manifests' tests (cached by content)"
	@bash hack/serving-crds/fetch.sh >/dev/null
	@bash hack/browser/install.sh >/dev/null
	@bash hack/images/build.sh >/dev/null
	@bash hack/pytest.sh

crds: setup
	@.venv/bin/kubetune crd --write crds --reference docs/reference.md
	@cp crds/finetunejobs.kubetune.io.yaml charts/kubetune/crds/

docs: setup
	@.venv/bin/python -m kubetune_devtools.module_maps --write

images: setup
	@bash hack/images/build.sh

lock: setup
	@bash hack/lock.sh

# The chart as a package for an OCI registry: `helm push build/chart/kubetune-<version>.tgz
# oci://<registry>/<path>`, then `helm install ... oci://<registry>/<path>/kubetune --version <v>`.
CHART_DIR ?= build/chart
chart:
	@mkdir -p $(CHART_DIR)
	@"$$(bash hack/helm/build.sh | tail -n 1)" package charts/kubetune --destination $(CHART_DIR)
