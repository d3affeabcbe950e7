"""Worker settings, read from ``SLIMGPT_*`` environment variables.

The API has its own ``app.core.config.Settings`` that reads the same variable names; the two are
kept deliberately small so they can be unified without renaming anything.

========================================  ===============================  =========================
variable                                  meaning                          default
========================================  ===============================  =========================
``SLIMGPT_BROKER_URL``                    Redis broker                     redis://127.0.0.1:6379/0
``SLIMGPT_BROKER_KEY_PREFIX``             prefix of every broker key       "" (none)
``SLIMGPT_QUEUE``                         queue this worker consumes       slimgpt
``SLIMGPT_JOB_SOFT_TIME_LIMIT_S``         soft limit (job may clean up)    21600 (6 h)
``SLIMGPT_JOB_HARD_TIME_LIMIT_S``         hard limit (process killed)      soft + 1800
``SLIMGPT_VISIBILITY_TIMEOUT_S``          redelivery delay after a crash   hard + 3600
``SLIMGPT_UNACKED_RESTORE_INTERVAL_S``    how often crashed jobs are swept 60
``SLIMGPT_HF_CACHE_DIR``                  Hub download cache               huggingface_hub default
``SLIMGPT_ARTIFACTS_DIR``                 published models, checkpoints    ./artifacts
``SLIMGPT_CACHE_DIR``                     tokenized calibration cache      ~/.cache/slimgpt
``SLIMGPT_LOCAL_MODELS_DIR``              allowed root for local models    unset: local models off
``SLIMGPT_MAX_ATTEMPTS``                  deliveries before a job fails    3
``SLIMGPT_HUB_ENDPOINT``                  Hub URL                          huggingface_hub default
``SLIMGPT_HUB_RETRIES``                   attempts for transient Hub errs  5
``SLIMGPT_HUB_BACKOFF_BASE_S``            first retry delay (doubles)      2.0
``SLIMGPT_HUB_BACKOFF_MAX_S``             longest retry delay              60.0
``SLIMGPT_RUNNER``                        ``module:function`` run per job  worker.runner:run_job
========================================  ===============================  =========================
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.retry import RetryPolicy

_SIX_HOURS = 6 * 3600


class WorkerSettings(BaseSettings):
    """Everything a GPU worker process needs; see the module docstring for the table."""

    model_config = SettingsConfigDict(env_prefix="SLIMGPT_", extra="ignore")

    broker_url: str = "redis://127.0.0.1:6379/0"
    broker_key_prefix: str = ""
    queue: str = "slimgpt"
    job_soft_time_limit_s: int = Field(default=_SIX_HOURS, gt=0)
    job_hard_time_limit_s: int | None = Field(default=None, gt=0)
    visibility_timeout_s: int | None = Field(default=None, gt=0)
    unacked_restore_interval_s: float = Field(default=60.0, gt=0)
    hf_cache_dir: Path | None = None
    artifacts_dir: Path = Path("artifacts")
    cache_dir: Path = Path("~/.cache/slimgpt").expanduser()
    local_models_dir: Path | None = None
    max_attempts: int = Field(default=3, ge=1)
    hub_endpoint: str | None = None
    hub_retries: int = Field(default=5, ge=1)
    hub_backoff_base_s: float = Field(default=2.0, ge=0)
    hub_backoff_max_s: float = Field(default=60.0, ge=0)
    runner: str = "worker.runner:run_job"

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> WorkerSettings:
        # Defaults derive from the soft limit so that setting only that one stays consistent.
        if self.job_hard_time_limit_s is None:
            self.job_hard_time_limit_s = self.job_soft_time_limit_s + 1800
        if self.visibility_timeout_s is None:
            self.visibility_timeout_s = self.job_hard_time_limit_s + 3600
        if self.job_hard_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError(
                "SLIMGPT_JOB_HARD_TIME_LIMIT_S must be greater than SLIMGPT_JOB_SOFT_TIME_LIMIT_S "
                "so a job gets the soft limit's chance to save its state"
            )
        # Redis redelivers an unacknowledged message after the visibility timeout even if the
        # worker holding it is alive, so a shorter timeout would start a second copy of a
        # running job.
        if self.visibility_timeout_s <= self.job_hard_time_limit_s:
            raise ValueError(
                "SLIMGPT_VISIBILITY_TIMEOUT_S must be greater than SLIMGPT_JOB_HARD_TIME_LIMIT_S, "
                "otherwise Redis redelivers jobs that are still running"
            )
        return self

    @property
    def hard_limit_s(self) -> int:
        assert self.job_hard_time_limit_s is not None  # set by the validator
        return self.job_hard_time_limit_s

    @property
    def visibility_s(self) -> int:
        assert self.visibility_timeout_s is not None  # set by the validator
        return self.visibility_timeout_s

    def hub_retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.hub_retries,
            base_delay_s=self.hub_backoff_base_s,
            max_delay_s=self.hub_backoff_max_s,
        )
