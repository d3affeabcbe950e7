"""The one Celery task: ``slimgpt.run_job(job_id)`` (task id = job id).

The message carries only the job id; everything else (model, token, options) is read from the
database by the runner, so secrets never pass through the broker. A message is only a wake-up:
the runner claims the job's lease, so a duplicate delivery does nothing.

:class:`JobRequest` runs in the worker's parent process. When the pool child running a job dies
(OOM killer, segfault, a poison job) or is killed at the hard time limit, it reports the lost
attempt to the database at once, so the job is retried after its backoff (or failed after
``SLIMGPT_JOB_MAX_ATTEMPTS`` losses) without waiting for the lease to expire.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, TimeLimitExceeded, WorkerLostError
from celery.worker.request import Request
from sqlalchemy.exc import OperationalError

from app.core.logging import job_context
from worker import fleet
from worker.ids import is_valid_job_id
from worker.lifecycle import process_prefix, stop_on_sigterm

RUN_JOB_TASK = "slimgpt.run_job"
RUNNER_CONF_KEY = "slimgpt_runner"

logger = logging.getLogger(__name__)

#: A delivery that cannot reach the database goes back to the queue after this pause.
DB_DOWN_REQUEUE_DELAY_S = 5.0


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
    @app.task(name=RUN_JOB_TASK, ignore_result=True, shared=False, Request=JobRequest)
    def run_job(job_id: str) -> None:
        if not is_valid_job_id(job_id):
            # Acked and dropped: redelivering a malformed message would fail forever.
            logger.error("rejecting %s message with a malformed job id", RUN_JOB_TASK)
            return
        # Imported per call, not at module import, so the worker's parent process stays free of
        # torch/CUDA (forked children must not inherit a CUDA context) and the lead's runner
        # can be swapped by setting.
        runner = load_runner(str(app.conf.get(RUNNER_CONF_KEY) or "worker.runner:run_job"))
        with job_context(job_id), stop_on_sigterm():  # job lines carry its id; SIGTERM hands back
            logger.info("running job %s", job_id)
            settings = getattr(app, "slimgpt_settings", None)
            if settings is not None:  # the fleet page shows which worker runs what
                fleet.starting(settings, fleet.process_worker_id(), job_id)
            try:
                runner(job_id)
            except OperationalError as err:
                # The database is unreachable, so the job cannot even be claimed: put the
                # message back (after a pause, not in a tight loop) rather than drop it.
                logger.warning("job %s: database unreachable (%s); requeueing the message",
                               job_id, type(err).__name__)
                time.sleep(DB_DOWN_REQUEUE_DELAY_S)
                raise Reject(str(err), requeue=True) from None

    return run_job  # type: ignore[no-any-return]


class JobRequest(Request):  # type: ignore[misc]
    """Celery's request, plus: a pool child lost while running a job reports it (parent side)."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback
        reason = None
        if isinstance(exc, TimeLimitExceeded):
            reason = f"hard time limit exceeded ({exc})"
        elif isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt)):
            reason = f"worker process {self.worker_pid} died ({exc})"
        job_id = self.args[0] if self.args else self.id
        if reason is not None and self.worker_pid and is_valid_job_id(job_id):
            report_lost_child(job_id, int(self.worker_pid), reason)
        return super().on_failure(exc_info, send_failed_event=send_failed_event,
                                  return_ok=return_ok)


def report_lost_child(job_id: str, pid: int, reason: str) -> None:
    """Record the lost attempt of the job that process ``pid`` held.

    This runs in the worker's parent process, which forks a fresh pool child right after: so it
    runs synchronously (a thread could hold a lock at the fork and deadlock the child) on a
    throwaway engine without a pool (no connection for the child to inherit), and gives up after
    a few seconds (the lease then expires and the dispatcher's sweeper does the same, later).
    """
    from sqlalchemy.orm import Session

    from app.crud import jobs as crud
    from app.db.session import make_engine
    from worker.settings import WorkerSettings

    try:
        settings = WorkerSettings()
        engine = make_engine(str(settings.database_url), null_pool=True, connect_timeout=3)
        try:
            with Session(engine, expire_on_commit=False) as s:
                job = crud.record_worker_lost(s, job_id, settings, reason=reason,
                                              owner_prefix=process_prefix(pid))
        finally:
            engine.dispose()
        if job is not None:
            logger.warning("job %s: %s; it is %s now", job_id, reason, job.state)
    except Exception:
        logger.warning("could not record the lost job %s; its lease will expire", job_id,
                       exc_info=True)


def enqueue_job(app: Celery, job_id: str, *, queue: str | None = None) -> str:
    """Send ``slimgpt.run_job(job_id)`` to ``queue`` (default: the app's default queue), with
    task id = job id. Returns the task id. (The service's dispatcher publishes through
    ``app.dispatch.CeleryPublisher``; this is for tools and tests.)
    """
    if not is_valid_job_id(job_id):
        raise ValueError(f"not a valid job id: {job_id!r}")
    options: dict[str, Any] = {}
    if queue is not None:
        options["queue"] = queue
    result = app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, **options)
    return str(result.id)
