# The API image: FastAPI + SQLAlchemy + Celery client, no torch (see pyproject's `service` extra).
# Build from the repository root:  docker build -f docker/api.Dockerfile -t slimgpt-api .
# PYTHON_IMAGE: any Debian/Ubuntu image with python3 (>= 3.10) and its venv module; the official
# slim image by default, a locally built one where no registry is reachable
# (docker/local-images.sh).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv

WORKDIR /srv/slimgpt
# Dependencies first, against empty packages, so a code change rebuilds only the last layers.
COPY pyproject.toml README.md ./
RUN mkdir -p app slimgpt_core migrations \
 && touch app/__init__.py slimgpt_core/__init__.py migrations/__init__.py \
 && pip install ".[service]" \
 && rm -rf app slimgpt_core migrations build *.egg-info

# Only what the API imports: app, migrations, and the torch-free parts of slimgpt_core
# (the /v1/estimate arithmetic). slimgpt_core does not import torch at import time.
COPY app ./app
COPY migrations ./migrations
COPY slimgpt_core ./slimgpt_core
# The checks run outside the source tree, so they import what was installed.
RUN pip install --no-deps --force-reinstall . \
 && cd / \
 && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
 && python -c "import app.main"

# Same uid as the worker image, so both can write the shared artifacts and uploads volumes.
RUN useradd --create-home --uid 10001 slimgpt \
 && mkdir -p /data/artifacts /data/uploads \
 && chown -R slimgpt:slimgpt /data
USER slimgpt
# Run from the user's home: the source tree above is only the build's input.
WORKDIR /home/slimgpt

ENV SLIMGPT_DATA_DIR=/data \
    SLIMGPT_ARTIFACTS_DIR=/data/artifacts \
    SLIMGPT_UPLOADS_DIR=/data/uploads \
    SLIMGPT_LOG_JSON=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["slimgpt", "serve", "--host", "0.0.0.0", "--port", "8000"]
