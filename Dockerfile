# The xmr images (CPU), two targets over one base:
#
#   docker build --target serve -t xmr:cpu .          # the API: ONNX Runtime + FAISS, no torch
#   docker build --target train -t xmr:cpu-train .    # + CPU torch and onnx: train, index build
#
# `serve` runs `xmr serve` (and reads artifacts); `train` runs everything: `xmr train` (alone or
# under torchrun), `xmr index build` and the compose/Kubernetes artifacts job `xmr-prepare`.
# Both build with the classic builder and with BuildKit; no stage here is CUDA (that is
# deploy/docker/Dockerfile.cuda), so a CPU build never pulls a CUDA image or a CUDA torch.
#
# Torch for `train`: a CPU wheel put in deploy/docker/wheels/ (torch-<TORCH_VERSION>+cpu-*.whl)
# is installed from there; otherwise torch comes from TORCH_INDEX, the PyTorch CPU index. Never
# from PyPI's default, which is the CUDA build. PYTHON_IMAGE: any Debian-based image with
# python3.11 and venv (deploy/stack/base-images.sh makes one where no registry answers).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- runtime: the interpreter, a non-root user (uid 10001) and the settings both images share.
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.description="Cross-market recommendations (Bert4XMR)"
RUN groupadd --system --gid 10001 xmr \
 && useradd --system --uid 10001 --gid xmr --home-dir /var/lib/xmr --shell /usr/sbin/nologin xmr \
 && mkdir -p /var/lib/xmr/artifacts /var/lib/xmr/data /var/lib/xmr/import \
 && chown -R xmr:xmr /var/lib/xmr
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XMR_ARTIFACTS=/var/lib/xmr/artifacts \
    XMR_HOST=0.0.0.0 \
    XMR_PORT=8000
WORKDIR /var/lib/xmr
EXPOSE 8000
VOLUME ["/var/lib/xmr/artifacts"]
# Liveness only: readiness (models, indexes, Redis) is /readyz, for orchestrators that route.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('XMR_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["xmr"]
# Host, port and artifacts come from the XMR_* variables above (override them, not the command).
CMD ["serve"]
USER 10001:10001

# ---- deps: a virtual environment with the serving dependencies of pyproject.toml.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml deploy/docker/requirements.py ./
RUN python3 -m venv /opt/venv \
 && python requirements.py pyproject.toml serve > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# ---- project: xmr as a wheel (sources change most often: last, and built once for both images).
FROM deps AS project
COPY README.md ./
COPY training ./training
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- serve: the API image. pip and setuptools leave its venv (nothing installs at run time).
FROM deps AS serve-venv
COPY --from=project /wheels /wheels
COPY deploy/docker/xmr-prepare deploy/docker/xmr-reload-replicas /opt/venv/bin/
RUN pip install --no-deps /wheels/*.whl \
 && python -m pip uninstall --yes pip setuptools

FROM runtime AS serve
LABEL org.opencontainers.image.title="xmr" io.xmr.image="serve"
COPY --from=serve-venv /opt/venv /opt/venv

# ---- train: + CPU torch and onnx, for `xmr train`, `xmr index build` and `xmr-prepare`.
FROM deps AS train-venv
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY deploy/docker/wheels/ /tmp/wheels/
# The wheel file, or TORCH_VERSION from the CPU index, is the pin.
# hadolint ignore=DL3013
RUN wheel="$(find /tmp/wheels -name "torch-${TORCH_VERSION}+cpu-*.whl" | head -n 1)" \
 && if [ -n "$wheel" ]; then pip install "$wheel"; \
    else pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX" \
           --extra-index-url https://pypi.org/simple; fi \
 && python requirements.py pyproject.toml train > /tmp/train.txt \
 && pip install -r /tmp/train.txt \
 && rm -rf /tmp/wheels
COPY --from=project /wheels /wheels
COPY deploy/docker/xmr-prepare deploy/docker/xmr-reload-replicas /opt/venv/bin/
RUN pip install --no-deps /wheels/*.whl

FROM runtime AS train
LABEL org.opencontainers.image.title="xmr-train" io.xmr.image="train"
COPY --from=train-venv /opt/venv /opt/venv
