"""The lease of a running job, and how a worker stops one early.

A job runs only while its worker holds the job's lease in the database; a background thread
renews it every third of ``SLIMGPT_JOB_LEASE_S``. A worker that dies stops renewing, and the
dispatcher's sweeper gives the job to another worker (``app.crud.jobs.record_worker_lost``).

Between layers and between phases the pipeline calls :meth:`JobControl.check`, which ends the
attempt when

* the lease was lost (another worker may hold it now): :class:`LeaseLost`, touch nothing;
* the worker is stopping (SIGTERM: ``docker stop``, scale-down, preemption): :class:`HandBack`,
  the finished layers are checkpointed and the job goes back to the queue at once;
* the job's owner asked to cancel: :class:`worker.errors.JobCancelled`.

In a Celery pool child, SIGTERM only sets :data:`STOP` while a job runs
(:func:`stop_on_sigterm`); the Celery parent forwards its own SIGTERM to the child
(``worker.celery_app``). The embedded worker passes its own stop event instead.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy.exc import OperationalError

from app.crud import jobs as crud
from app.db.session import session_scope
from worker.errors import JobCancelled
from worker.retry import retry_while

logger = logging.getLogger(__name__)

#: The cancel flag is read from the database at most this often.
CANCEL_POLL_S = 1.0

#: Set by SIGTERM in a worker process while a job runs: hand the job back at the next boundary.
STOP = threading.Event()


T = TypeVar("T")


def retry_db(fn: Callable[[], T], *, budget_s: float, what: str) -> T:
    """``fn()``, retried while the database is unreachable for up to ``budget_s`` (a Postgres
    restart or failover), so that a short outage does not cost a running job its attempt."""
    return retry_while(fn, retryable=OperationalError, budget_s=budget_s,
                       what=f"database access while {what}")


class LeaseLost(Exception):
    """Another worker took the job over (our lease expired); stop without touching it."""


class HandBack(Exception):
    """The worker is stopping: give the job back, to be resumed from its checkpoints."""


def new_worker_id() -> str:
    """``host:pid:tag``: the host for messages, the pid so a Celery parent can tell which lease
    its dead child held, the tag so two runs in one process never share a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def process_prefix(pid: int, host: str | None = None) -> str:
    """The worker-id prefix of every lease taken by process ``pid`` on this host."""
    return f"{host or socket.gethostname()}:{pid}:"


@contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """While a job runs in this (main) thread, SIGTERM sets :data:`STOP` instead of exiting."""
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    STOP.clear()

    def handler(signum: int, frame: Any) -> None:
        STOP.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield STOP
    finally:
        signal.signal(signal.SIGTERM, previous)


class LeaseKeeper:
    """Renews the job's lease every third of its length on a daemon thread."""

    def __init__(self, settings: Any, job_id: str, worker_id: str) -> None:
        self.settings, self.job_id, self.worker_id = settings, job_id, worker_id
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id[:8]}",
                                        daemon=True)

    def __enter__(self) -> LeaseKeeper:  # noqa: PYI034 - final class
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def renew(self) -> bool:
        with session_scope(self.settings) as s:
            ok = crud.renew_lease(s, self.job_id, self.worker_id, self.settings.job_lease_s)
        if not ok:
            self.lost.set()
        return ok

    def _loop(self) -> None:
        interval = max(0.2, self.settings.job_lease_s / 3)
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    logger.warning("lost the lease of job %s", self.job_id)
                    return
            except Exception:
                # The database may be back before the lease runs out; keep trying.
                logger.warning("could not renew the lease of job %s", self.job_id, exc_info=True)


class JobControl:
    """What a running pipeline checks at its boundaries (layers, phases)."""

    def __init__(self, settings: Any, job_id: str, lease: LeaseKeeper,
                 stop: threading.Event) -> None:
        self.settings, self.job_id, self.lease, self.stop = settings, job_id, lease, stop
        self._cancel = False
        self._last_cancel_check = 0.0

    def _cancel_requested(self, throttle: bool) -> bool:
        now = time.monotonic()
        if not throttle or now - self._last_cancel_check >= CANCEL_POLL_S:
            self._last_cancel_check = now
            try:
                with session_scope(self.settings) as s:
                    self._cancel = crud.is_cancel_requested(s, self.job_id)
            except OperationalError:
                # Unreachable database: keep going; the lease decides whether we may finish.
                logger.warning("could not read the cancel flag of job %s", self.job_id)
        return self._cancel

    def should_stop(self) -> bool:
        """Cheap enough to call between layers (the cancel flag is polled at most every
        second): True when :meth:`check` would raise."""
        return (self.lease.lost.is_set() or self.stop.is_set()
                or self._cancel_requested(throttle=True))

    def check(self) -> None:
        """Raise :class:`LeaseLost`, :class:`HandBack` or ``JobCancelled`` when the attempt must
        end here."""
        self.raise_reason(throttle=False)

    def raise_reason(self, *, throttle: bool = True, cause: BaseException | None = None) -> None:
        if self.lease.lost.is_set():
            raise LeaseLost() from cause
        if self.stop.is_set():
            raise HandBack() from cause
        if self._cancel_requested(throttle=throttle):
            raise JobCancelled() from cause
