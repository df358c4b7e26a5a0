# syntax=docker/dockerfile:1.7
# The xmr image: the `xmr` CLI (serve, train, index build) on a small runtime stage.
#
#   docker build -t xmr:cpu .                                   # default: CPU torch, faiss-cpu
#   docker build -t xmr:cuda --build-arg VARIANT=cuda .         # CUDA torch + faiss-gpu-cu12
#
# VARIANT=cuda starts from an nvidia/cuda runtime image (Ubuntu's python3.11), installs torch from
# the PyTorch CUDA index given by TORCH_CUDA_INDEX and swaps faiss-cpu for the faiss-gpu-cu12
# wheel; it needs the NVIDIA container toolkit on the host (`--gpus all` / the compose `gpu`
# profile). The CPU variant never downloads CUDA: torch comes from the PyTorch CPU index before
# anything else can pull the default (CUDA) build from PyPI.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04

# ---- interpreters: the builder and the runtime of one variant share the same python3.11 path,
# so the virtual environment built in one runs in the other.
FROM ${PYTHON_IMAGE} AS python-cpu

FROM ${CUDA_IMAGE} AS python-cuda
# The CUDA base image's tag pins the Ubuntu release, and so these packages' versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM python-${VARIANT} AS python

# ---- builder: a virtual environment in /opt/venv with torch, the dependencies and xmr.
FROM python AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG FAISS_GPU=faiss-gpu-cu12>=1.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Torch first, from the index of the variant (its own layer: the largest and the least changed).
RUN index=https://download.pytorch.org/whl/cpu \
 && if [ "$VARIANT" = cuda ]; then index="$TORCH_CUDA_INDEX"; fi \
 && python3.11 -m venv /opt/venv \
 && pip install "torch==${TORCH_VERSION}" --index-url "$index"

# The project's dependencies from pyproject.toml alone, so source edits keep this layer cached.
WORKDIR /src
COPY pyproject.toml deploy/docker/requirements.py ./
RUN python requirements.py pyproject.toml "$VARIANT" "$FAISS_GPU" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY README.md ./
COPY training ./training
COPY service ./service
# Byte code stays: replicas that autoscaling starts import torch faster with it.
RUN pip install --no-deps .

# ---- runtime: the venv, the artifact scripts, a non-root user; nothing to compile with.
FROM python AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="xmr" \
      org.opencontainers.image.description="Cross-market recommendation service (Bert4XMR, FAISS)" \
      io.xmr.variant="${VARIANT}"
RUN groupadd --system --gid 10001 xmr \
 && useradd --system --uid 10001 --gid xmr --home-dir /var/lib/xmr --shell /usr/sbin/nologin xmr \
 && mkdir -p /var/lib/xmr/artifacts /var/lib/xmr/data /var/lib/xmr/import \
 && chown -R xmr:xmr /var/lib/xmr
COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/xmr-prepare deploy/docker/xmr-reload-replicas /usr/local/bin/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XMR_ARTIFACTS=/var/lib/xmr/artifacts \
    XMR_HOST=0.0.0.0 \
    XMR_PORT=8000
WORKDIR /var/lib/xmr
USER 10001:10001
EXPOSE 8000
VOLUME ["/var/lib/xmr/artifacts"]
# Liveness only: readiness (models, indexes, Redis) is /readyz, for orchestrators that route.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('XMR_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["xmr"]
# Host, port and artifacts come from the XMR_* variables above (override them, not the command).
CMD ["serve"]
