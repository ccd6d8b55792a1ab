# syntax=docker/dockerfile:1
# kubetune's two images, from one source tree:
#
#   docker build --target operator -t kubetune/operator:0.1.0 .   # slim Python, kopf, no torch
#   docker build --target trainer  -t kubetune/trainer:0.1.0  .   # slim Python, torch (its wheels
#                                                                  # carry the CUDA libraries), TRL
#
# Each installs its pinned third-party dependencies first (requirements/<target>.txt, with hashes;
# `make lock` writes them from pyproject.toml), in a layer of their own, then the project itself
# without dependencies: a source change rebuilds only the last, small layer. uv (pinned by
# UV_VERSION) lives in a cache mount of its own, like its download cache: neither is in the image. The trainer
# needs no CUDA base image: torch's Linux wheels bring the CUDA runtime, cuBLAS, cuDNN and NCCL as
# Python packages; the node brings only the NVIDIA driver (minimum version in docs/install.md). Base images are pinned by tag; pin them by digest for
# production builds: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>.
#
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret; it is mounted only into
# the steps that download and never lands in a layer:
#   docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt ...
# `make images` (hack/images/build.sh) builds both targets with buildah, daemonless.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_VERSION=0.13.9

# ---------------------------------------------------------------------------------------------
# The source: only what the distribution is built from (.dockerignore keeps the rest out).
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api/ api/
COPY operator/ operator/
COPY trainer/ trainer/
COPY cli/ cli/
COPY local/ local/
COPY server/ server/

# ---------------------------------------------------------------------------------------------
# Operator: kopf + kubernetes client, no torch; also kubetune-server (the chart's server.enabled).
FROM ${PYTHON_IMAGE} AS operator
ARG UV_VERSION
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kubetune's kopf operator for FineTuneJobs" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 kubetune \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent kubetune
COPY requirements/operator.txt /opt/kubetune-requirements/
RUN --mount=type=cache,id=kubetune-uv-bin,target=/opt/uv \
    --mount=type=cache,id=kubetune-uv,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle PIP_CERT=/run/secrets/ca-bundle; fi \
 && export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_NO_PROGRESS=1 uv=/opt/uv/${UV_VERSION}/bin/uv \
 && { [ -x "$uv" ] || { python3 -m venv /opt/uv/${UV_VERSION} && /opt/uv/${UV_VERSION}/bin/pip install -q --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"; }; } \
 && "$uv" venv /opt/kubetune \
 && "$uv" pip install --python /opt/kubetune/bin/python --compile-bytecode \
      --require-hashes -r /opt/kubetune-requirements/operator.txt
COPY requirements/build.txt /opt/kubetune-requirements/
COPY --from=source /src /opt/kubetune-src
RUN --mount=type=cache,id=kubetune-uv-bin,target=/opt/uv \
    --mount=type=cache,id=kubetune-uv,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle PIP_CERT=/run/secrets/ca-bundle; fi \
 && export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_NO_PROGRESS=1 uv=/opt/uv/${UV_VERSION}/bin/uv \
 && { [ -x "$uv" ] || { python3 -m venv /opt/uv/${UV_VERSION} && /opt/uv/${UV_VERSION}/bin/pip install -q --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"; }; } \
 && "$uv" pip install --python /opt/kubetune/bin/python --compile-bytecode --no-deps \
      --build-constraint /opt/kubetune-requirements/build.txt /opt/kubetune-src \
 && /opt/kubetune/bin/python -P -c "import importlib.metadata as m; print('kubetune-operator', m.version('kubetune'))" > /opt/kubetune/IMAGE-VERSION
# Nothing writes bytecode at run time: the root filesystem is read-only in the chart.
ENV PATH=/opt/kubetune/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so the kubelet can verify runAsNonRoot.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["kubetune-operator"]

# ---------------------------------------------------------------------------------------------
# Trainer: torch + the trainer extra on the same slim Python.
FROM ${PYTHON_IMAGE} AS trainer
ARG UV_VERSION
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="kubetune's QLoRA SFT trainer (TRL, PEFT, bitsandbytes)" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 1000 is what the operator sets as runAsUser/fsGroup.
RUN groupadd --gid 1000 kubetune \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/kubetune kubetune
COPY requirements/trainer.txt /opt/kubetune-requirements/
# Bytecode compiled here: the root is read-only at run time and torch's import is thousands of
# modules.
RUN --mount=type=cache,id=kubetune-uv-bin,target=/opt/uv \
    --mount=type=cache,id=kubetune-uv,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle PIP_CERT=/run/secrets/ca-bundle; fi \
 && export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_NO_PROGRESS=1 uv=/opt/uv/${UV_VERSION}/bin/uv \
 && { [ -x "$uv" ] || { python3 -m venv /opt/uv/${UV_VERSION} && /opt/uv/${UV_VERSION}/bin/pip install -q --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"; }; } \
 && "$uv" venv /opt/kubetune \
 && "$uv" pip install --python /opt/kubetune/bin/python --compile-bytecode \
      --require-hashes -r /opt/kubetune-requirements/trainer.txt
COPY requirements/build.txt /opt/kubetune-requirements/
COPY --from=source /src /opt/kubetune-src
RUN --mount=type=cache,id=kubetune-uv-bin,target=/opt/uv \
    --mount=type=cache,id=kubetune-uv,target=/root/.cache/uv \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle PIP_CERT=/run/secrets/ca-bundle; fi \
 && export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_NO_PROGRESS=1 uv=/opt/uv/${UV_VERSION}/bin/uv \
 && { [ -x "$uv" ] || { python3 -m venv /opt/uv/${UV_VERSION} && /opt/uv/${UV_VERSION}/bin/pip install -q --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"; }; } \
 && "$uv" pip install --python /opt/kubetune/bin/python --compile-bytecode --no-deps \
      --build-constraint /opt/kubetune-requirements/build.txt /opt/kubetune-src \
 && /opt/kubetune/bin/python -P -c "import importlib.metadata as m; print('kubetune-trainer', m.version('kubetune'))" > /opt/kubetune/IMAGE-VERSION
ENV PATH=/opt/kubetune/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/kubetune/.cache/huggingface
USER 1000:1000
WORKDIR /home/kubetune
ENTRYPOINT ["kubetune-trainer"]
