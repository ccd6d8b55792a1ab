# syntax=docker/dockerfile:1
# kubetune's two images, from one source tree:
#
#   docker build --target operator -t kubetune/operator:0.1.0 .   # slim Python, kopf, no torch
#   docker build --target trainer  -t kubetune/trainer:0.1.0  .   # CUDA runtime, torch, TRL, PEFT
#
# Base images are pinned by tag here. For reproducible production builds pin them by digest too,
# e.g. --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> (docs/install.md shows
# how to look the digest up). tests/chart/test_dockerfile.py parses this file and runs the same
# `pip install .[operator]` / `.[trainer]` in a clean virtual environment.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

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
# Operator: kopf + kubernetes client in a virtual environment, copied into a clean slim image.
FROM ${PYTHON_IMAGE} AS operator-build
RUN python -m venv /opt/kubetune
COPY --from=source /src /src
RUN /opt/kubetune/bin/pip install --no-cache-dir "/src[operator]"

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
# Trainer: CUDA runtime base (its Python is 3.12), torch + the trainer extra in a venv.
FROM ${CUDA_IMAGE} AS trainer-base
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM trainer-base AS trainer-build
RUN python3 -m venv /opt/kubetune
COPY --from=source /src /src
RUN /opt/kubetune/bin/pip install --no-cache-dir "/src[trainer]"

FROM trainer-base AS trainer
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="kubetune's QLoRA SFT trainer (TRL, PEFT, bitsandbytes)" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 1000 is what the operator sets as runAsUser/fsGroup; the base image's own uid-1000
# user ("ubuntu") gives way to ours.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 kubetune \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/kubetune kubetune
COPY --from=trainer-build /opt/kubetune /opt/kubetune
ENV PATH=/opt/kubetune/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/kubetune/.cache/huggingface
USER 1000:1000
WORKDIR /home/kubetune
ENTRYPOINT ["kubetune-trainer"]
