"""The dispatcher: the one loop per deployment that moves jobs from the database to the broker
and brings back the jobs of lost workers.

``POST /v1/jobs`` only commits the job (with ``next_dispatch_at`` = now) and wakes the
dispatcher; the request never waits on the broker. The elected leader (:mod:`app.leader`)
runs passes of:

1. **Sweep**: a running job whose lease expired (its worker stopped renewing it: process killed,
   host lost, hard time limit) counts a lost attempt and is queued again after an exponential,
   jittered backoff, or failed after ``SLIMGPT_JOB_MAX_ATTEMPTS`` losses
   (``app.crud.jobs.record_worker_lost``). It resumes from its per-layer checkpoints.
2. **Broker check**: if Redis lost its data (restart without persistence), every queued job is
   made due again at once.
3. **Publish**: every queued job that is due is sent (``slimgpt.run_job``, task id = job id, to
   ``queue_for_job``) and then marked; a queued job nobody claims is sent again after
   ``SLIMGPT_REPUBLISH_AFTER_S``, doubling up to an hour. A crash between sending and marking
   sends it twice, which is harmless: the lease decides who runs.

A pass runs when a job becomes ready (NOTIFY on Postgres, an in-process event on SQLite), when
the next job falls due, and at least every ``SLIMGPT_SWEEP_INTERVAL_S``. Where it runs: a
background thread of every API process (``SLIMGPT_DISPATCHER_ENABLED``, default on), and/or
``slimgpt dispatcher``; the candidates elect one leader. In embedded mode (no broker) only the
sweep runs: the embedded worker takes queued jobs straight from the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.crud import jobs as crud
from app.crud import outbox
from app.db import notify
from app.db.base import utcnow
from app.dispatch import CeleryPublisher, Publisher, queue_for_job
from app.leader import Leadership, make_leadership

log = logging.getLogger("slimgpt.dispatcher")

#: Jobs sent per database read.
BATCH = 500


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        session_factory: Callable[[], Session],
        *,
        publisher: Publisher | None = None,
        leadership: Leadership | None = None,
        sweep_grace_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        if publisher is None and not settings.embedded:
            publisher = CeleryPublisher(settings)
        self.publisher = publisher
        self.leadership = leadership or make_leadership(str(settings.database_url),
                                                        settings.leader_lease_s)
        # Stand-by candidates try this often, so a frozen leader is replaced within about
        # lease + lease/3 (default 15 + 5 s), a dead one within lease/3.
        self.retry_s = min(settings.sweep_interval_s, settings.leader_lease_s / 3)
        # Workers cannot renew while the database is unreachable, so right after an outage (or
        # a new leader's start) give them one renewal period before calling them lost.
        self.sweep_grace_s = (settings.job_lease_s / 3 + 1 if sweep_grace_s is None
                              else sweep_grace_s)
        self.is_leader = False
        self.counts = {"published": 0, "requeued": 0, "failed": 0, "broker_resets": 0}
        self._wake = notify.subscribe()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._db_ok_since: float | None = None
        self._broker_failures = 0
        self._broker_retry_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self.run_forever, name="slimgpt-dispatcher",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.leadership.release()
        notify.unsubscribe(self._wake)
        if self.publisher is not None:
            self.publisher.reset()

    def wake(self) -> None:
        self._wake.set()

    def request_stop(self) -> None:
        """Make :meth:`run_forever` return (safe from a signal handler)."""
        self._stop.set()
        self._wake.set()

    def run_forever(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if not self.leadership.acquire():
                    if self.is_leader:
                        log.warning("no longer the dispatcher leader")
                    self.is_leader = False
                    self._stop.wait(self.retry_s)
                    continue
                if not self.is_leader:
                    self.is_leader, self._db_ok_since = True, None
                self._wake.clear()
                wait_s = self.run_pass()
                failures = 0
                self.leadership.wait(wait_s, self._wake, self._stop)
            except Exception:
                failures += 1
                self._db_ok_since = None
                log.warning("dispatcher pass failed (database unreachable?); retrying",
                            exc_info=failures == 1)
                self._stop.wait(min(self.retry_s, 0.5 * 2 ** min(failures, 6)))
        self.leadership.release()
        self.is_leader = False

    # -- one pass ----------------------------------------------------------------------------
    def run_pass(self) -> float:
        """Sweep, check the broker, publish; returns the seconds until the next pass is due."""
        if self._db_ok_since is None:
            self._db_ok_since = time.monotonic()
        self.sweep()
        if self.publisher is not None:
            self.check_broker()
            self.publish_due()
        return self._next_wait()

    def sweep(self) -> int:
        """Requeue (or fail) the running jobs whose lease expired; returns how many."""
        if (self._db_ok_since is None
                or time.monotonic() - self._db_ok_since < self.sweep_grace_s):
            return 0
        with self.session_factory() as s:
            ids = outbox.expired_leases(s, utcnow())
        changed = 0
        for job_id in ids:
            with self.session_factory() as s:
                job = crud.record_worker_lost(s, job_id, self.settings, reason="lease expired",
                                              expired_only=True)
            if job is not None:
                changed += 1
                self.counts["failed" if job.state == "failed" else "requeued"] += 1
        return changed

    def check_broker(self) -> None:
        assert self.publisher is not None
        try:
            lost = self.publisher.broker_lost_messages()
        except Exception as err:  # noqa: BLE001 - the broker is down; publishing will say so
            log.debug("broker check failed: %s", err)
            return
        if lost:
            with self.session_factory() as s:
                n = outbox.redispatch_all(s, utcnow())
            log.warning("the broker has lost its messages (restarted without persistence, or "
                        "new): sending the %d queued jobs again", n)

    def publish_due(self) -> int:
        """Send every due job; returns how many were sent."""
        assert self.publisher is not None
        if time.monotonic() < self._broker_retry_at:
            return 0
        total = 0
        while not self._stop.is_set():
            now = utcnow()
            with self.session_factory() as s:
                due = outbox.due_for_dispatch(s, now, BATCH)
            if not due:
                break
            sent: list[outbox.Due] = []
            error: Exception | None = None
            fenced = False
            for item in due:
                # A leader that was frozen past its lease must not send (app.leader).
                if not self.leadership.fence():
                    fenced = True
                    break
                try:
                    self.publisher.publish(item.job.id, queue_for_job(item.job, self.settings))
                except Exception as err:  # noqa: BLE001 - any broker error ends this pass
                    error = err
                    break
                sent.append(item)
            if sent:
                with self.session_factory() as s:
                    outbox.mark_dispatched(s, sent, utcnow(), self.settings)
                total += len(sent)
                self.counts["published"] += len(sent)
            if error is not None:
                self._broker_failed(error, len(due) - len(sent))
                break
            if fenced:
                log.warning("no longer the dispatcher leader: %d due jobs left to the new one",
                            len(due) - len(sent))
                break
            self._broker_failures = 0
            if len(due) < BATCH:
                break
        return total

    def _broker_failed(self, error: Exception, pending: int) -> None:
        self._broker_failures += 1
        delay = min(self.settings.sweep_interval_s, 0.25 * 2 ** min(self._broker_failures, 6))
        self._broker_retry_at = time.monotonic() + delay
        self.counts["broker_resets"] += 1
        log.warning("cannot reach the broker (%s: %s); %d jobs wait in the database, retrying "
                    "in %.1f s", type(error).__name__, error, pending, delay)
        assert self.publisher is not None
        self.publisher.reset()

    def _next_wait(self) -> float:
        wait = self.settings.sweep_interval_s
        if self.publisher is not None:
            with self.session_factory() as s:
                due_in = outbox.seconds_to_next_dispatch(s, utcnow())
            if due_in is not None:
                wait = min(wait, due_in)
            retry_in = self._broker_retry_at - time.monotonic()
            if retry_in > 0:
                wait = max(wait, retry_in)
        return max(0.01, wait)
