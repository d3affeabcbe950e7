"""The Celery application for GPU workers: ``celery -A worker.celery_app worker``.

Tuned for jobs that hold a GPU for hours: a message is acknowledged only when its job ends, a
worker takes one message at a time, and a message whose worker died comes back.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger

from worker.liveness import Heartbeat
from worker.redact import install_redaction
from worker.settings import WorkerSettings
from worker.tasks import RUNNER_CONF_KEY, register_tasks


def celery_config(settings: WorkerSettings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (separate from the app so it can be tested)."""
    transport_options: dict[str, Any] = {
        # Longer than the hard limit, so Redis never hands a running job to a second worker;
        # only a job whose worker died comes back, after this many seconds.
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
        # A job that raised or hit its hard limit is done (the runner recorded why); requeueing it
        # would loop. Poison jobs are bounded by SLIMGPT_MAX_ATTEMPTS in the runner.
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        # A fresh child per job returns all GPU memory and any leaked state to the system.
        "worker_max_tasks_per_child": 1,
        "task_soft_time_limit": settings.job_soft_time_limit_s,
        "task_time_limit": settings.hard_limit_s,
        "task_default_queue": settings.queue,
        "task_create_missing_queues": True,
        # Without this, a broker outage lets the message reappear while the job still runs here.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        RUNNER_CONF_KEY: settings.runner,
    }


def make_celery(settings: WorkerSettings | None = None) -> Celery:
    """A Celery app with ``slimgpt.run_job`` registered, configured from ``settings``."""
    settings = settings if settings is not None else WorkerSettings()
    app = Celery("slimgpt", set_as_current=False)
    app.conf.update(celery_config(settings))
    register_tasks(app)
    app.steps["worker"].add(Heartbeat)
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
    install_redaction(logger)


# Celery rebuilds handlers when the worker starts; attach the filter to the new ones.
after_setup_logger.connect(_redact_celery_logs, weak=False)
after_setup_task_logger.connect(_redact_celery_logs, weak=False)

app = make_celery()
