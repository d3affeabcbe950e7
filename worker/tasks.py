"""The one Celery task: ``slimgpt.run_job(job_id)``.

The message carries only the job id; everything else (model, token, options) is read from the
database by the runner, so secrets never pass through the broker.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from app.core.logging import job_context
from worker import fleet
from worker.ids import is_valid_job_id

RUN_JOB_TASK = "slimgpt.run_job"
RUNNER_CONF_KEY = "slimgpt_runner"

logger = logging.getLogger(__name__)


def load_runner(spec: str) -> Callable[[str], Any]:
    """Import ``"module:function"``; tests point it at a fake through ``SLIMGPT_RUNNER``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"runner must look like 'module:function', got {spec!r}")
    runner = getattr(importlib.import_module(module_name), attr)
    if not callable(runner):
        raise TypeError(f"runner {spec!r} is not callable")
    return runner  # type: ignore[no-any-return]


def register_tasks(app: Celery) -> Task:
    """Register ``slimgpt.run_job`` on ``app`` and return the task."""

    # shared=False: each app gets its own task object instead of a process-wide one.
    @app.task(name=RUN_JOB_TASK, ignore_result=True, shared=False)
    def run_job(job_id: str) -> None:
        if not is_valid_job_id(job_id):
            # Acked and dropped: redelivering a malformed message would fail forever.
            logger.error("rejecting %s message with a malformed job id", RUN_JOB_TASK)
            return
        # Imported per call, not at module import, so the worker's parent process stays free of
        # torch/CUDA (forked children must not inherit a CUDA context) and the lead's runner
        # can be swapped by setting.
        runner = load_runner(str(app.conf.get(RUNNER_CONF_KEY) or "worker.runner:run_job"))
        settings = getattr(app, "slimgpt_settings", None)
        with job_context(job_id):  # every log line of the job carries its id
            logger.info("running job %s", job_id)
            if settings is not None:  # the fleet page shows which worker runs what
                fleet.starting(settings, fleet.process_worker_id(), job_id)
            runner(job_id)

    return run_job  # type: ignore[no-any-return]


def enqueue_job(app: Celery, job_id: str, *, queue: str | None = None) -> str:
    """Send ``slimgpt.run_job(job_id)`` to ``queue`` (default: the app's default queue).

    Returns the Celery task id. The API calls this after committing the job row.
    """
    if not is_valid_job_id(job_id):
        raise ValueError(f"not a valid job id: {job_id!r}")
    options: dict[str, Any] = {}
    if queue is not None:
        options["queue"] = queue
    result = app.send_task(RUN_JOB_TASK, args=[job_id], **options)
    return str(result.id)
