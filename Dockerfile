# syntax=docker/dockerfile:1
# kubetune's two images, from one source tree:
#
#   docker build --target operator -t kubetune/operator:0.1.0 .   # slim Python, kopf, no torch
#   docker build --target trainer  -t kubetune/trainer:0.1.0  .   # slim Python, torch (its wheels
#                                                                  # carry the CUDA libraries), TRL
#
# Both install the distribution with one extra into a clean virtual environment. The trainer needs no CUDA base image: torch's Linux wheels bring the CUDA
# runtime, cuBLAS, cuDNN and NCCL as Python packages; the node brings only the NVIDIA driver
# (minimum version in docs/install.md). Base images are pinned by tag; pin them by digest for
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

# ---------------------------------------------------------------------------------------------
# uv, pinned, in a virtual environment of its own (the base's Python may be externally managed).
FROM ${PYTHON_IMAGE} AS uv
ARG UV_VERSION
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && python3 -m venv /opt/uv \
 && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
ENV UV_PROJECT_ENVIRONMENT=/opt/kubetune \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_NO_PROGRESS=1

# ---------------------------------------------------------------------------------------------
# Operator: kopf + kubernetes client in a virtual environment, copied into a clean slim image.
FROM uv AS operator-build
COPY --from=source /src /src
WORKDIR /src
RUN --mount=type=cache,id=kubetune-uv,target=/root/.cache/uv,sharing=locked \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi \
 && /opt/uv/bin/uv venv /opt/kubetune \
 && /opt/uv/bin/uv pip install --python /opt/kubetune/bin/python --compile-bytecode "/src[operator]" \
 && /opt/kubetune/bin/python -P -c "import importlib.metadata as m; print('kubetune-operator', m.version('kubetune'))" > /opt/kubetune/IMAGE-VERSION

FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kubetune's kopf operator for FineTuneJobs" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 kubetune \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent kubetune
COPY --from=operator-build /opt/kubetune /opt/kubetune
# Nothing writes bytecode at run time: the root filesystem is read-only in the chart.
ENV PATH=/opt/kubetune/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so the kubelet can verify runAsNonRoot.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["kubetune-operator"]

# ---------------------------------------------------------------------------------------------
# Trainer: torch + the trainer extra in a virtual environment on the same slim Python.
FROM uv AS trainer-build
COPY --from=source /src /src
WORKDIR /src
RUN --mount=type=cache,id=kubetune-uv,target=/root/.cache/uv,sharing=locked \
    --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle; fi \
 && /opt/uv/bin/uv venv /opt/kubetune \
 && /opt/uv/bin/uv pip install --python /opt/kubetune/bin/python "/src[trainer]" \
 && /opt/kubetune/bin/python -P -c "import importlib.metadata as m; print('kubetune-trainer', m.version('kubetune'))" > /opt/kubetune/IMAGE-VERSION

FROM ${PYTHON_IMAGE} AS trainer
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="kubetune's QLoRA SFT trainer (TRL, PEFT, bitsandbytes)" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 1000 is what the operator sets as runAsUser/fsGroup.
RUN groupadd --gid 1000 kubetune \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/kubetune kubetune
COPY --from=trainer-build /opt/kubetune /opt/kubetune
ENV PATH=/opt/kubetune/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/kubetune/.cache/huggingface
USER 1000:1000
WORKDIR /home/kubetune
ENTRYPOINT ["kubetune-trainer"]
