# The API image: FastAPI + SQLAlchemy + Celery client, no torch (see pyproject's `service` extra).
# Build from the repository root:  docker build -f docker/api.Dockerfile -t slimgpt-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/slimgpt
# Only what the API imports: app, migrations, and the torch-free parts of slimgpt_core
# (the /v1/estimate arithmetic). slimgpt_core does not import torch at import time.
COPY pyproject.toml README.md ./
COPY app ./app
COPY migrations ./migrations
COPY slimgpt_core ./slimgpt_core
RUN pip install ".[service]" \
 && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
 && python -c "import app.main"

# Same uid as the worker image, so both can write the shared artifacts and uploads volumes.
RUN useradd --create-home --uid 10001 slimgpt \
 && mkdir -p /data/artifacts /data/uploads \
 && chown -R slimgpt:slimgpt /data
USER slimgpt

ENV SLIMGPT_DATA_DIR=/data \
    SLIMGPT_ARTIFACTS_DIR=/data/artifacts \
    SLIMGPT_UPLOADS_DIR=/data/uploads \
    SLIMGPT_LOG_JSON=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["slimgpt", "serve", "--host", "0.0.0.0", "--port", "8000"]
