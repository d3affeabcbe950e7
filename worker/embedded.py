"""The embedded mode's worker: a thread of the API process that takes queued jobs straight from
the database (no broker) and runs them one at a time.

It is what ``SLIMGPT_EMBEDDED_WORKER`` names by default; the API starts it when no broker is
configured. It delivers job ids to the same runner as the Celery task (``runner(job_id)``), and
the runner claims the job with the same lease, so "the database decides" holds alike: a job in
its retry backoff is not taken early, a job whose lease expired comes back through the
dispatcher's sweeper, and at shutdown the running job is handed back at its next layer boundary
and resumed from its checkpoints when the service starts again.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable

from app.core.config import Settings
from app.core.logging import job_context
from app.crud import jobs as crud
from app.crud import outbox
from app.db import notify
from app.db.base import utcnow
from app.db.models import Job
from app.db.session import get_session_factory
from worker import fleet

log = logging.getLogger("slimgpt.embedded")

#: What the job pipeline imports beyond the API's own dependencies (the `worker` extra).
WORKER_MODULES = ("torch", "transformers", "safetensors", "huggingface_hub")
#: Longest sleep between looks at the database when nothing woke the worker.
POLL_S = 2.0
#: A job the runner returned without taking is not offered again for this long.
DECLINED_PAUSE_S = 60.0


def _default_runner(settings: Settings, stop_event: threading.Event) -> Callable[[str], None]:
    def run(job_id: str) -> None:
        try:
            from worker.runner import run_job  # lazy: imports torch only when a job runs
        except ImportError as err:
            raise RuntimeError(
                f"the embedded worker is unavailable ({err}); install the `worker` extra"
            ) from err
        run_job(job_id, settings, stop_event=stop_event)

    return run


class EmbeddedWorker:
    """Runs queued jobs on one daemon thread, oldest first."""

    def __init__(self, settings: Settings, runner: Callable[[str], None] | None = None,
                 *, poll_s: float = POLL_S) -> None:
        self.settings = settings
        self.session_factory = get_session_factory(settings)
        self._stop = threading.Event()
        #: Set when the worker stops; the runner hands its job back at the next layer.
        self.stop_event = self._stop
        self._default_runner = runner is None
        self.runner = runner or _default_runner(settings, self._stop)
        self.poll_s = poll_s
        self._wake = notify.subscribe()
        self._thread: threading.Thread | None = None
        self._running: str | None = None
        # Jobs a runner returned without taking (a runner may decline) -> when to offer them
        # again, so that the loop never spins on them.
        self._declined: dict[str, float] = {}
        #: The worker's row in the fleet table (dashboard, metrics), while it runs.
        self.heartbeat: fleet.Heartbeat | None = None

    def unavailable_reason(self) -> str | None:
        """Why this worker could not run a job, or None: the job pipeline needs the `worker`
        extra (torch, transformers, ...), which an API-only install lacks. Checked without
        importing anything (the API process stays torch-free)."""
        if not self._default_runner:
            return None
        missing = [m for m in WORKER_MODULES if importlib.util.find_spec(m) is None]
        if not missing:
            return None
        return ("this server cannot run jobs: its embedded worker needs the `worker` extra "
                f"(missing {', '.join(missing)}); pip install 'slimgpt-service[worker]', or "
                "run Celery workers (SLIMGPT_BROKER_URL)")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.heartbeat is None:
            self.heartbeat = fleet.Heartbeat(self.settings, kind="embedded").start()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="slimgpt-embedded-worker",
                                            daemon=True)
            self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop taking jobs; the running one is handed back at its next layer boundary."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the embedded worker did not stop within %s s; its job's lease will "
                            "expire and the job will be resumed on the next start", timeout)
        notify.unsubscribe(self._wake)
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def wake(self) -> None:
        self._wake.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job runs and none is claimable (tests, ``slimgpt demo``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._running is None and self._next() is None and self._running is None:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    # -- the loop ----------------------------------------------------------------------------
    def _next(self) -> str | None:
        now = time.monotonic()
        for job_id, until in list(self._declined.items()):
            if until <= now:
                self._declined.pop(job_id, None)
        with self.session_factory() as s:
            return outbox.next_claimable_job(s, utcnow(), exclude=list(self._declined))

    def _wait_s(self) -> float:
        with self.session_factory() as s:
            due = outbox.seconds_to_next_claimable(s, utcnow())
        return self.poll_s if due is None else max(0.01, min(self.poll_s, due))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._wake.clear()
                job_id = self._next()
                if job_id is None:
                    self._wake.wait(self._wait_s())
                    continue
                self._run(job_id)
            except Exception:
                log.exception("embedded worker: database error; retrying")
                self._stop.wait(self.poll_s)

    def _run(self, job_id: str) -> None:
        self._running = job_id
        try:
            with job_context(job_id):  # every log line of the job carries its id
                if self.heartbeat is not None:  # the fleet page shows which worker runs what
                    fleet.starting(self.settings, self.heartbeat.worker_id, job_id)
                self.runner(job_id)
        except Exception as err:
            log.exception("the runner raised", extra={"job_id": job_id})
            self._fail(job_id, err)
        finally:
            self._note_declined(job_id)
            self._running = None

    def _note_declined(self, job_id: str) -> None:
        with self.session_factory() as s:
            row = s.get(Job, job_id)
            still_waiting = row is not None and row.state == "queued" and (
                row.available_at is None or row.available_at <= utcnow())
            s.rollback()
        if still_waiting and not self._stop.is_set():
            log.warning("the runner returned without taking queued job %s; offering it again "
                        "in %.0f s", job_id, DECLINED_PAUSE_S)
            self._declined[job_id] = time.monotonic() + DECLINED_PAUSE_S

    def _fail(self, job_id: str, err: Exception) -> None:
        """A runner that raised leaves no job behind in ``running``."""
        try:
            with self.session_factory() as s:
                crud.finish_job(s, job_id, "failed",
                                error=f"worker error: {type(err).__name__}: {err}")
        except Exception:
            log.exception("could not record the runner failure", extra={"job_id": job_id})
