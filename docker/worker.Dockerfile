# The worker image: torch + the `worker` extra; runs `slimgpt worker` (Celery, one job at a time
# per container/GPU). One Dockerfile for both variants; only the base and the torch build differ:
#
#   CUDA (production, the defaults):
#     docker build -f docker/worker.Dockerfile -t slimgpt-worker .
#   CPU (tests, CPU-only hosts):
#     docker build -f docker/worker.Dockerfile -t slimgpt-worker:cpu \
#       --build-arg BASE_IMAGE=python:3.11-slim \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# BASE_IMAGE: a Debian/Ubuntu image; python3 and its venv module are installed if missing.
# TORCH_INDEX_URL: the wheel index of the torch build; it must match the CUDA runtime of the base
# image (cu128 for CUDA 12.8) and the host's driver.
# TORCH_SPEC: which torch, e.g. "torch==2.11.*".
# TORCH_FIND_LINKS: optional extra wheel location (a URL), e.g. a local HTTP server that serves a
# wheel already on the build host (docker/local-images.sh does that); empty by default.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_FIND_LINKS=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv

# torch first, from its own index, so the project install does not pull another build.
RUN pip install --index-url "${TORCH_INDEX_URL}" \
      ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} "${TORCH_SPEC}"

WORKDIR /srv/slimgpt
# Dependencies next, against empty packages, so a code change rebuilds only the last layers.
COPY pyproject.toml README.md ./
RUN mkdir -p app slimgpt_core migrations worker \
 && touch app/__init__.py slimgpt_core/__init__.py migrations/__init__.py worker/__init__.py \
 && pip install ".[worker]" \
 && rm -rf app slimgpt_core migrations worker build *.egg-info

COPY app ./app
COPY migrations ./migrations
COPY slimgpt_core ./slimgpt_core
COPY worker ./worker
# The check runs outside the source tree, so it imports what was installed.
RUN pip install --no-deps --force-reinstall . && cd / && python -c "import worker.celery_app, app.main"

# Same uid as the API image, so both can write the shared artifacts and uploads volumes.
RUN useradd --create-home --uid 10001 slimgpt \
 && mkdir -p /data/artifacts /data/uploads /cache/huggingface /cache/slimgpt \
 && chown -R slimgpt:slimgpt /data /cache
USER slimgpt
# Run from the user's home: the source tree above is only the build's input.
WORKDIR /home/slimgpt

ENV SLIMGPT_DATA_DIR=/data \
    SLIMGPT_ARTIFACTS_DIR=/data/artifacts \
    SLIMGPT_UPLOADS_DIR=/data/uploads \
    SLIMGPT_CACHE_DIR=/cache/slimgpt \
    SLIMGPT_HF_CACHE_DIR=/cache/huggingface/hub \
    HF_HOME=/cache/huggingface \
    SLIMGPT_LOG_JSON=1
# Liveness: the worker's main process refreshes a heartbeat file from Celery's event loop
# (worker/liveness.py); a job runs in a child process, so a long layer does not stop it.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["python", "-m", "worker.liveness"]
CMD ["slimgpt", "worker"]
