"""Worker settings: the API's :class:`app.core.config.Settings`, plus the worker's checks.

There is one settings class and one table of ``SLIMGPT_*`` variables (the docstring of
:mod:`app.core.config`), so ``SLIMGPT_DATABASE_URL``, ``SLIMGPT_BROKER_URL``,
``SLIMGPT_BROKER_KEY_PREFIX``, ``SLIMGPT_CELERY_QUEUE``, ``SLIMGPT_ARTIFACTS_DIR``,
``SLIMGPT_LOCAL_MODELS_DIR`` and the time limits mean the same thing in the API and in a worker.
This subclass adds only:

* ``queue`` / ``max_attempts``: short names for ``celery_queue`` / ``job_max_attempts`` (also
  accepted as constructor arguments; the old variables ``SLIMGPT_QUEUE`` and
  ``SLIMGPT_MAX_ATTEMPTS`` are aliases of ``SLIMGPT_CELERY_QUEUE`` / ``SLIMGPT_JOB_MAX_ATTEMPTS``);
* validation that the hard limit exceeds the soft one and the visibility timeout the hard one
  (a shorter visibility timeout makes Redis hand a running job to a second worker);
* ``effective_broker_url``: a worker needs a broker; unset, it uses ``redis://127.0.0.1:6379/0``
  (``slimgpt worker`` refuses to start without ``SLIMGPT_BROKER_URL`` instead).
"""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from app.core.config import Settings
from worker.retry import RetryPolicy

DEFAULT_DEV_BROKER = "redis://127.0.0.1:6379/0"
_SHORT_NAMES = {"queue": "celery_queue", "max_attempts": "job_max_attempts"}


class WorkerSettings(Settings):
    """Everything a GPU worker process needs; see :mod:`app.core.config` for the table."""

    @model_validator(mode="before")
    @classmethod
    def _short_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for short, full in _SHORT_NAMES.items():
                if short in data:
                    data = dict(data)
                    data.setdefault(full, data.pop(short))
        return data

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> WorkerSettings:
        if self.hard_limit_s <= self.job_soft_time_limit_s:
            raise ValueError(
                "SLIMGPT_JOB_HARD_TIME_LIMIT_S must be greater than SLIMGPT_JOB_SOFT_TIME_LIMIT_S "
                "so a job gets the soft limit's chance to save its state"
            )
        # Redis redelivers an unacknowledged message after the visibility timeout even if the
        # worker holding it is alive, so a shorter timeout would start a second copy of a
        # running job.
        if self.visibility_s <= self.hard_limit_s:
            raise ValueError(
                "SLIMGPT_VISIBILITY_TIMEOUT_S must be greater than SLIMGPT_JOB_HARD_TIME_LIMIT_S, "
                "otherwise Redis redelivers jobs that are still running"
            )
        return self

    @property
    def queue(self) -> str:
        return self.celery_queue

    @property
    def max_attempts(self) -> int:
        return self.job_max_attempts

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or DEFAULT_DEV_BROKER

    @property
    def hard_limit_s(self) -> int:
        assert self.job_hard_time_limit_s is not None  # set by Settings' validator
        return self.job_hard_time_limit_s

    @property
    def visibility_s(self) -> int:
        assert self.visibility_timeout_s is not None  # set by Settings' validator
        return self.visibility_timeout_s

    def hub_retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.hub_retries,
            base_delay_s=self.hub_backoff_base_s,
            max_delay_s=self.hub_backoff_max_s,
        )
