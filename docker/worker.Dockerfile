# The GPU worker image: CUDA runtime + torch + the `worker` extra; runs `slimgpt worker`
# (Celery, one job at a time per container/GPU).
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t slimgpt-worker .
# TORCH_INDEX_URL picks the torch build; it must match the CUDA runtime of the base image.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# torch first, from the CUDA index, so the project install does not pull a CPU build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /srv/slimgpt
COPY pyproject.toml README.md ./
COPY app ./app
COPY migrations ./migrations
COPY slimgpt_core ./slimgpt_core
COPY worker ./worker
RUN pip install ".[worker]" && python -c "import worker.celery_app"

RUN useradd --create-home --uid 10001 slimgpt \
 && mkdir -p /data/artifacts /data/uploads /cache/huggingface /cache/slimgpt \
 && chown -R slimgpt:slimgpt /data /cache
USER slimgpt

ENV SLIMGPT_DATA_DIR=/data \
    SLIMGPT_ARTIFACTS_DIR=/data/artifacts \
    SLIMGPT_UPLOADS_DIR=/data/uploads \
    SLIMGPT_CACHE_DIR=/cache/slimgpt \
    SLIMGPT_HF_CACHE_DIR=/cache/huggingface/hub \
    HF_HOME=/cache/huggingface \
    SLIMGPT_LOG_JSON=1
CMD ["slimgpt", "worker"]
