"""How a committed job reaches a worker: only its id is sent, never a token or the request.

* :class:`CeleryDispatcher` (production, ``SLIMGPT_BROKER_URL`` set): sends the task by name
  ``slimgpt.run_job`` with ``args=[job_id]`` to ``SLIMGPT_CELERY_QUEUE``. It builds its own
  Celery app from the settings and does not import the ``worker`` package.
* :class:`InProcessDispatcher` (embedded default): one background thread runs jobs one at a time
  through ``runner(job_id)``, by default ``worker.runner.run_job`` imported lazily in the thread.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from app.core.config import Settings
from app.core.logging import job_context

log = logging.getLogger("slimgpt.dispatch")

TASK_NAME = "slimgpt.run_job"


class Dispatcher(Protocol):
    def enqueue(self, job_id: str) -> None: ...


class CeleryDispatcher:
    def __init__(self, settings: Settings, celery_app: Any | None = None) -> None:
        self.settings = settings
        self._app = celery_app

    @property
    def celery_app(self) -> Any:
        if self._app is None:
            from celery import Celery

            self._app = Celery("slimgpt-api", broker=self.settings.broker_url)
            self._app.conf.update(task_serializer="json", accept_content=["json"],
                                  broker_connection_retry_on_startup=False,
                                  broker_connection_timeout=5)
            if self.settings.broker_key_prefix:
                # The workers consume under the same prefix (one shared settings table).
                self._app.conf.broker_transport_options = {
                    "global_keyprefix": self.settings.broker_key_prefix}
        return self._app

    def enqueue(self, job_id: str) -> None:
        self.celery_app.send_task(TASK_NAME, args=[job_id], queue=self.settings.celery_queue)
        log.info("job sent to queue %s", self.settings.celery_queue, extra={"job_id": job_id})

    def ping(self) -> bool:
        """The broker answers (used by /readyz)."""
        url = str(self.settings.broker_url)
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
            try:
                return bool(client.ping())
            finally:
                client.close()
        with self.celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True


def _default_runner(job_id: str, settings: Settings | None = None) -> None:
    try:
        from worker.runner import run_job  # lazy: the worker package imports torch
    except ImportError as err:
        raise RuntimeError(
            f"the embedded worker is unavailable ({err}); install the `worker` extra"
        ) from err
    # The API's own settings: the embedded worker uses the same database and directories.
    run_job(job_id, settings)


class InProcessDispatcher:
    """Runs jobs on one daemon thread, one at a time, in submission order."""

    def __init__(
        self,
        runner: Callable[[str], None] | None = None,
        session_factory: Callable[[], Any] | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.runner = runner or _default_runner
        self.session_factory = session_factory
        #: With settings, the worker shows up in the fleet table (heartbeat, current job).
        self.settings = settings
        self.heartbeat: Any | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.idle = threading.Event()
        self.idle.set()

    def start(self) -> None:
        with self._lock:
            if self.settings is not None and self.heartbeat is None:
                from worker.fleet import Heartbeat  # torch-free; lazy like the runner

                self.heartbeat = Heartbeat(self.settings, kind="embedded").start()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="slimgpt-inprocess-worker",
                                                daemon=True)
                self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def enqueue(self, job_id: str) -> None:
        self.idle.clear()
        self._queue.put(job_id)
        self.start()
        log.info("job queued on the in-process worker", extra={"job_id": job_id})

    def stop(self, timeout: float | None = 5.0) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every enqueued job has been run (tests, `slimgpt demo`)."""
        return self.idle.wait(timeout)

    def _loop(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                with job_context(job_id):  # every log line of the job carries its id
                    self._starting(job_id)
                    self.runner(job_id)
            except Exception as err:
                log.exception("in-process runner raised", extra={"job_id": job_id})
                self._fail(job_id, err)
            finally:
                if self._queue.empty():
                    self.idle.set()

    def _starting(self, job_id: str) -> None:
        if self.heartbeat is not None and self.settings is not None:
            from worker.fleet import starting

            starting(self.settings, self.heartbeat.worker_id, job_id)

    def _fail(self, job_id: str, err: Exception) -> None:
        """A runner that raised leaves no job behind in `running`."""
        if self.session_factory is None:
            return
        from app.crud.jobs import finish_job

        try:
            with self.session_factory() as session:
                finish_job(session, job_id, "failed",
                           error=f"worker error: {type(err).__name__}: {err}")
        except Exception:
            log.exception("could not record the runner failure", extra={"job_id": job_id})


def make_dispatcher(
    settings: Settings,
    runner: Callable[[str], None] | None = None,
    session_factory: Callable[[], Any] | None = None,
) -> Dispatcher:
    if settings.embedded:
        return InProcessDispatcher(runner or functools.partial(_default_runner, settings=settings),
                                   session_factory, settings)
    return CeleryDispatcher(settings)
