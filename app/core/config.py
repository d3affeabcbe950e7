"""All service settings in one place: environment variables with the ``SLIMGPT_`` prefix.

| variable                        | default                          | meaning                                      |
|---------------------------------|----------------------------------|----------------------------------------------|
| SLIMGPT_DATA_DIR                | ./.slimgpt                       | root of everything the embedded mode writes   |
| SLIMGPT_DATABASE_URL            | sqlite:///<data_dir>/slimgpt.db  | SQLAlchemy URL (postgresql+psycopg://… prod)  |
| SLIMGPT_BROKER_URL              | unset = embedded in-process worker | Celery broker (redis://…) = production      |
| SLIMGPT_BROKER_KEY_PREFIX       | "" (none)                        | prefix of every broker key (API and workers)  |
| SLIMGPT_CELERY_QUEUE            | slimgpt                          | queue the API sends `slimgpt.run_job` to and a worker consumes (alias SLIMGPT_QUEUE) |
| SLIMGPT_ARTIFACTS_DIR           | <data_dir>/artifacts             | pruned model folders and checkpoints, one folder per job |
| SLIMGPT_UPLOADS_DIR             | <data_dir>/uploads               | uploaded calibration files                    |
| SLIMGPT_LOCAL_MODELS_DIR        | <data_dir>/models                | root for local model folders / .gguf files (model_id) |
| SLIMGPT_HF_CACHE_DIR            | unset (huggingface default)      | Hub cache for the worker                      |
| SLIMGPT_CACHE_DIR               | ~/.cache/slimgpt                 | worker: tokenized calibration windows cache   |
| SLIMGPT_HUB_ENDPOINT            | unset (huggingface default)      | worker: Hub URL                               |
| SLIMGPT_HUB_RETRIES             | 5                                | worker: attempts for transient Hub errors     |
| SLIMGPT_HUB_BACKOFF_BASE_S      | 2.0                              | worker: first Hub retry delay (doubles)       |
| SLIMGPT_HUB_BACKOFF_MAX_S       | 60.0                             | worker: longest Hub retry delay               |
| SLIMGPT_SECRET_KEY              | embedded: generated into data_dir | Fernet key encrypting Hub tokens (prod: required) |
| SLIMGPT_MAX_UPLOAD_BYTES        | 104857600 (100 MiB)              | largest accepted calibration upload           |
| SLIMGPT_MAX_BODY_BYTES          | 1048576 (1 MiB)                  | largest JSON request body                     |
| SLIMGPT_JOB_SOFT_TIME_LIMIT_S   | 21600                            | Celery soft time limit of one job             |
| SLIMGPT_JOB_HARD_TIME_LIMIT_S   | soft + 1800                      | Celery hard time limit of one job             |
| SLIMGPT_VISIBILITY_TIMEOUT_S    | hard + 3600                      | Redis redelivers an unacked job after this (> hard limit) |
| SLIMGPT_UNACKED_RESTORE_INTERVAL_S | 60                            | worker: how often messages of dead workers are swept |
| SLIMGPT_JOB_MAX_ATTEMPTS        | 3                                | deliveries before a job is failed (alias SLIMGPT_MAX_ATTEMPTS) |
| SLIMGPT_JOB_LEASE_S             | 120                              | worker lease length (renewed every third of it) |
| SLIMGPT_DISPATCHER_ENABLED      | true                             | api: run the dispatcher thread (leader-elected) |
| SLIMGPT_SWEEP_INTERVAL_S        | 15                               | dispatcher: lease sweep period                |
| SLIMGPT_LEADER_LEASE_S          | 15                               | dispatcher leader lease (renewed every third of it): a frozen or hung leader is replaced within about 4/3 of it |
| SLIMGPT_REPUBLISH_AFTER_S       | 300                              | dispatcher: re-send a queued job nobody took (doubles, max 1 h) |
| SLIMGPT_RETRY_BACKOFF_BASE_S    | 10                               | delay before the retry of a lost job (doubles, jittered) |
| SLIMGPT_RETRY_BACKOFF_MAX_S     | 600                              | longest delay before a retry                  |
| SLIMGPT_EMBEDDED_WORKER         | worker.embedded:EmbeddedWorker   | embedded mode: the in-process worker (empty = none) |
| SLIMGPT_GPU_POOLS               | unset = one pool: the queue, SLIMGPT_WORKER_GPUS GPUs | worker pools `queue=COUNTxTYPE[@GB]`, comma-separated; jobs are routed by `resources` |
| SLIMGPT_WORKER_GPUS             | 1                                | GPUs a worker may use for one job             |
| SLIMGPT_STREAM_MODELS           | auto                             | worker: `auto` streams models larger than host memory from disk; `always`, `never` |
| SLIMGPT_RUNNER                  | worker.runner:run_job            | worker: `module:function` run per job (tests) |
| SLIMGPT_WORKER_MAX_TASKS_PER_CHILD | 1                             | worker: jobs per pool process (0 = no limit)  |
| SLIMGPT_ZERO_SHOT_TASKS_DIR     | unset                            | worker: extra lm-eval task YAML files (e.g. offline copies of tasks) |
| SLIMGPT_LOG_JSON                | false                            | one JSON object per log line                  |
| SLIMGPT_LOG_LEVEL               | INFO                             |                                              |
| SLIMGPT_AUTH_DISABLED           | false                            | embedded only: every request is tenant `local` |
| SLIMGPT_AUTO_MIGRATE            | unset = true for SQLite          | run `alembic upgrade head` at API startup     |
| SLIMGPT_SSE_HEARTBEAT_S         | 15                               | SSE comment line when no event arrived        |
| SLIMGPT_SSE_POLL_S              | 0.5                              | how often the SSE stream polls the event table |
| SLIMGPT_WORKER_HEARTBEAT_S      | 15                               | worker: fleet-table heartbeat; lost after 3 missed |
| SLIMGPT_UI_SESSION_TTL_S        | 43200 (12 h)                     | dashboard sign-in lifetime                    |
| SLIMGPT_UI_COOKIE_SECURE        | unset = only over https          | `Secure` flag on the dashboard session cookie |
| SLIMGPT_DB_TIMEOUT_S            | 2                                | api: longest wait for the database: connecting, a pooled connection, a lock |
| SLIMGPT_DB_STATEMENT_TIMEOUT_S  | 10                               | api: Postgres statement_timeout               |
| SLIMGPT_HEALTH_TIMEOUT_S        | 1.5                              | /readyz: longest wait for each dependency     |
| SLIMGPT_RATE_LIMIT_PER_MINUTE   | 600                              | API requests per tenant per minute, all replicas together (0 = no limit) |
| SLIMGPT_RATE_LIMIT_BURST        | 100                              | requests a tenant may send at once before the rate applies |
| SLIMGPT_MAX_QUEUED_JOBS_PER_TENANT | 100                           | queued jobs per tenant; more submissions get 429 (0 = no limit) |
| SLIMGPT_UPLOAD_BYTES_PER_DAY    | 10737418240 (10 GiB)             | upload bytes per tenant in any 24 h (0 = no limit) |

The API and the workers read this one class (``worker.settings.WorkerSettings`` derives from it
and only adds checks), so every variable means the same thing in both processes.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("slimgpt.config")


class ConfigError(RuntimeError):
    """The settings cannot run the service (e.g. production without a secret key)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIMGPT_", extra="ignore",
                                      populate_by_name=True)

    data_dir: Path = Path("./.slimgpt")
    database_url: str | None = None
    broker_url: str | None = None
    broker_key_prefix: str = ""
    celery_queue: str = Field(
        "slimgpt", validation_alias=AliasChoices("SLIMGPT_CELERY_QUEUE", "SLIMGPT_QUEUE"))
    artifacts_dir: Path | None = None
    uploads_dir: Path | None = None
    local_models_dir: Path | None = None
    hf_cache_dir: Path | None = None
    cache_dir: Path = Path("~/.cache/slimgpt").expanduser()
    hub_endpoint: str | None = None
    hub_retries: int = Field(5, ge=1)
    hub_backoff_base_s: float = Field(2.0, ge=0)
    hub_backoff_max_s: float = Field(60.0, ge=0)
    secret_key: SecretStr | None = None

    max_upload_bytes: int = Field(100 * 1024 * 1024, gt=0)
    max_body_bytes: int = Field(1024 * 1024, gt=0)
    job_soft_time_limit_s: int = Field(6 * 3600, gt=0)
    job_hard_time_limit_s: int | None = Field(None, gt=0)
    visibility_timeout_s: int | None = Field(None, gt=0)
    unacked_restore_interval_s: float = Field(60.0, gt=0)
    job_max_attempts: int = Field(
        3, ge=1, validation_alias=AliasChoices("SLIMGPT_JOB_MAX_ATTEMPTS", "SLIMGPT_MAX_ATTEMPTS"))
    job_lease_s: float = Field(120, gt=0)
    runner: str = "worker.runner:run_job"
    speed_benchmark: bool = True
    # Extra lm-eval task YAML files for zero-shot evaluation (the `zeroshot` extra).
    zero_shot_tasks_dir: Path | None = None
    # A fresh process per job returns all GPU memory; CPU-only fleets (and tests) may reuse.
    worker_max_tasks_per_child: int = Field(1, ge=0)

    # The dispatcher (outbox publisher + lease sweeper), see app/dispatcher.py.
    dispatcher_enabled: bool = True
    sweep_interval_s: float = Field(15.0, gt=0)
    leader_lease_s: float = Field(15.0, gt=0)
    republish_after_s: float = Field(300.0, gt=0)
    retry_backoff_base_s: float = Field(10.0, ge=0)
    retry_backoff_max_s: float = Field(600.0, ge=0)
    # Embedded mode only: the in-process worker the API starts ("module:attr"; "" = none).
    # A setting rather than an import so that `app` does not depend on `worker`.
    embedded_worker: str = "worker.embedded:EmbeddedWorker"
    gpu_pools: str = ""
    worker_gpus: int = Field(1, ge=1, le=64)
    stream_models: Literal["auto", "always", "never"] = "auto"

    log_json: bool = False
    log_level: str = "INFO"
    auth_disabled: bool = False
    auto_migrate: bool | None = None
    sse_heartbeat_s: float = Field(15.0, gt=0)
    sse_poll_s: float = Field(0.5, gt=0)
    worker_heartbeat_s: float = Field(15.0, gt=0)
    ui_session_ttl_s: int = Field(12 * 3600, gt=0)
    ui_cookie_secure: bool | None = None

    # Bounded waits (docs/RELIABILITY.md, "Request path"): a request gives up on a dead or hung
    # dependency and answers 503, instead of holding a thread.
    db_timeout_s: float = Field(2.0, gt=0)
    db_statement_timeout_s: float = Field(10.0, gt=0)
    health_timeout_s: float = Field(1.5, gt=0)
    # Per-tenant limits (429 + Retry-After), counted in the database so that every API replica
    # shares them. 0 turns a limit off.
    rate_limit_per_minute: int = Field(600, ge=0)
    rate_limit_burst: int = Field(100, ge=1)
    max_queued_jobs_per_tenant: int = Field(100, ge=0)
    upload_bytes_per_day: int = Field(10 * 1024**3, ge=0)

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        base = Path(self.data_dir)
        if self.database_url is None:
            self.database_url = f"sqlite:///{(base / 'slimgpt.db').resolve()}"
        if self.artifacts_dir is None:
            self.artifacts_dir = base / "artifacts"
        if self.uploads_dir is None:
            self.uploads_dir = base / "uploads"
        if self.local_models_dir is None:
            self.local_models_dir = base / "models"
        if self.auto_migrate is None:
            self.auto_migrate = self.is_sqlite
        # Derived from the soft limit so that setting only that one stays consistent.
        if self.job_hard_time_limit_s is None:
            self.job_hard_time_limit_s = self.job_soft_time_limit_s + 1800
        if self.visibility_timeout_s is None:
            self.visibility_timeout_s = self.job_hard_time_limit_s + 3600
        return self

    # -- derived ---------------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        """No broker configured: jobs run on an in-process worker thread."""
        return not self.broker_url

    @property
    def is_sqlite(self) -> bool:
        return str(self.database_url).startswith("sqlite")

    def validate_for_serving(self) -> None:
        if self.auth_disabled and not self.embedded:
            raise ConfigError("SLIMGPT_AUTH_DISABLED is only allowed in embedded mode (no broker)")
        if not self.embedded and self.secret_key is None:
            raise ConfigError(
                "SLIMGPT_SECRET_KEY is required in production (a Fernet key, e.g. from "
                "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`)"
            )
        if (self.job_hard_time_limit_s or 0) <= self.job_soft_time_limit_s:
            raise ConfigError("SLIMGPT_JOB_HARD_TIME_LIMIT_S must exceed SLIMGPT_JOB_SOFT_TIME_LIMIT_S")

    def fernet_key(self) -> bytes:
        """The Fernet key for Hub tokens; in embedded mode one is generated into data_dir."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        if not self.embedded:
            raise ConfigError("SLIMGPT_SECRET_KEY is required in production")
        path = Path(self.data_dir) / "secret.key"
        if path.exists():
            return path.read_bytes().strip()
        from cryptography.fernet import Fernet

        path.parent.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        log.warning("SLIMGPT_SECRET_KEY is unset: generated a Hub-token encryption key at %s "
                    "(embedded mode only; keep this file, tokens cannot be read without it)", path)
        return key


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment (cached)."""
    return Settings()
