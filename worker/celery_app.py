"""The Celery application for GPU workers: ``celery -A worker.celery_app worker``.

Tuned for jobs that hold a GPU for hours: a worker takes one message at a time and acknowledges
it when its job ends. Recovery does not rest on the broker: the job's lease in the database
decides who runs, and the dispatcher's sweeper brings back the job of a dead worker within
lease + sweep interval (the visibility timeout below only bounds how long Redis keeps a dead
worker's message). SIGTERM to the worker is forwarded to the child running the job, which stops
at its next layer boundary and hands the job back.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from app.core.logging import adopt_handlers
from app.db.session import forget_inherited_connections
from worker import fleet
from worker.liveness import LivenessFile
from worker.redact import install_redaction
from worker.settings import WorkerSettings
from worker.tasks import RUNNER_CONF_KEY, register_tasks


def celery_config(settings: WorkerSettings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (separate from the app so it can be tested)."""
    transport_options: dict[str, Any] = {
        # Longer than the hard limit. A message of a dead worker comes back after this, long
        # after the sweeper has requeued its job; the duplicate finds the job taken and is dropped.
        "visibility_timeout": settings.visibility_s,
        # How often a worker sweeps for messages of dead workers. kombu's default (10 s x every
        # 10th call) is fine in production; tests shrink the interval.
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
    }
    if settings.broker_key_prefix:
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    return {
        "broker_url": settings.effective_broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # Postgres holds job state; a result backend would be a second, stale copy.
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # JSON only: a pickle-accepting worker executes whatever lands in Redis.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A job that raised is done (the runner recorded why); one whose child died or hit the
        # hard limit was reported lost by JobRequest, and the dispatcher sends it again after
        # its backoff. Poison jobs are bounded by SLIMGPT_JOB_MAX_ATTEMPTS losses.
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        # A fresh child per job returns all GPU memory and any leaked state to the system.
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child or None,
        "task_soft_time_limit": settings.job_soft_time_limit_s,
        "task_time_limit": settings.hard_limit_s,
        "task_default_queue": settings.queue,
        "task_create_missing_queues": True,
        # A Redis blip must not kill a GPU job that runs fine: the lease keeps a redelivered
        # copy of the message from starting it a second time.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Task events for Flower / `celery events` (task id = job id).
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        RUNNER_CONF_KEY: settings.runner,
    }


def make_celery(settings: WorkerSettings | None = None) -> Celery:
    """A Celery app with ``slimgpt.run_job`` registered, configured from ``settings``."""
    settings = settings if settings is not None else WorkerSettings()
    app = Celery("slimgpt", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.slimgpt_settings = settings  # type: ignore[attr-defined]  # read by the task and the heartbeat
    register_tasks(app)
    app.steps["worker"].add(LivenessFile)
    install_redaction()
    return app


def worker_argv(settings: WorkerSettings, *, hostname: str | None = None) -> list[str]:
    """Arguments for ``app.worker_main``: one job at a time on ``settings.queue``."""
    argv = [
        "worker",
        "--queues", settings.queue,
        "--concurrency", "1",
        # prefork, not solo: the hard time limit is enforced by killing a child process.
        "--pool", "prefork",
        # Gossip/mingle exist for remote control and revokes; cancellation goes through the DB.
        "--without-gossip",
        "--without-mingle",
        "--loglevel", "INFO",
    ]
    if hostname:
        argv += ["--hostname", hostname]
    return argv


def _redact_celery_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    """Celery built its handlers: our format (JSON under SLIMGPT_LOG_JSON=1) and redaction."""
    if logger is None:
        install_redaction()
        return
    adopt_handlers(logger, WorkerSettings().log_json)


def _forward_shutdown(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    """Warm shutdown (SIGTERM, e.g. ``docker stop``): pass SIGTERM on to the pool children that
    run jobs, so each stops at its next layer boundary and hands its job back; the worker then
    exits as soon as they have, instead of waiting for the jobs to finish."""
    if how != "Warm":
        return
    from celery.worker import state

    for request in list(state.active_requests):
        pid = getattr(request, "worker_pid", None)
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _preload_runner(**_: Any) -> None:
    """Import the job pipeline's module once in the parent, so that the fresh child of every
    job inherits it instead of importing it again (seconds per job). ``worker.runner`` imports
    torch only inside a job, so the parent stays free of CUDA."""
    import worker.runner  # noqa: F401


_heartbeats: dict[str, fleet.Heartbeat] = {}


def _settings_of(sender: Any) -> WorkerSettings | None:
    return getattr(getattr(sender, "app", None), "slimgpt_settings", None)


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """In the parent, before the pool forks: children inherit the node name as their worker id."""
    if _settings_of(sender) is not None:
        fleet.set_process_worker_id(sender.hostname)


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    settings = _settings_of(sender)
    if settings is None:
        return
    node = sender.hostname
    _heartbeats[node] = fleet.Heartbeat(settings, kind="celery", worker_id=node,
                                        queue=settings.queue).start()


def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    heartbeat = _heartbeats.pop(getattr(sender, "hostname", ""), None)
    if heartbeat is not None:
        heartbeat.stop()


worker_init.connect(_on_worker_init, weak=False)
worker_ready.connect(_on_worker_ready, weak=False)
worker_shutdown.connect(_on_worker_shutdown, weak=False)

# Celery rebuilds handlers when the worker starts; attach the filter to the new ones.
after_setup_logger.connect(_redact_celery_logs, weak=False)
after_setup_task_logger.connect(_redact_celery_logs, weak=False)
worker_shutting_down.connect(_forward_shutdown, weak=False)
worker_init.connect(_preload_runner, weak=False)
worker_process_init.connect(lambda **_: forget_inherited_connections(), weak=False)

app = make_celery()
