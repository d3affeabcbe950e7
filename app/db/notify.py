"""Wake-ups when a job becomes ready to be sent to the broker or claimed.

A transaction that makes a job ready (a submission, a hand-back, a requeue) calls
:func:`job_ready`. On PostgreSQL that adds ``NOTIFY slimgpt_jobs`` to the transaction: Postgres
delivers it only when the transaction commits, to every connection that listens, so the
dispatcher leader wakes up in whichever process it runs. In this process, the events returned by
:func:`subscribe` are set after the commit (the embedded worker and an in-process dispatcher,
also on SQLite).

Wake-ups only cut latency; nothing depends on them arriving. The dispatcher sweeps every
``SLIMGPT_SWEEP_INTERVAL_S`` and the embedded worker polls as well.
"""

from __future__ import annotations

import threading

from sqlalchemy import event, text
from sqlalchemy.orm import Session

CHANNEL = "slimgpt_jobs"
_FLAG = "slimgpt_job_ready"

_lock = threading.Lock()
_listeners: set[threading.Event] = set()


def job_ready(session: Session) -> None:
    """Wake the dispatcher and the embedded worker once this session's transaction commits."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
    session.info[_FLAG] = True


def subscribe() -> threading.Event:
    """An event that is set whenever a job becomes ready in this process."""
    wake = threading.Event()
    with _lock:
        _listeners.add(wake)
    return wake


def unsubscribe(wake: threading.Event) -> None:
    with _lock:
        _listeners.discard(wake)


def wake_local() -> None:
    with _lock:
        listeners = list(_listeners)
    for wake in listeners:
        wake.set()


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop(_FLAG, False):
        wake_local()


@event.listens_for(Session, "after_soft_rollback")
def _after_rollback(session: Session, previous_transaction: object) -> None:
    session.info.pop(_FLAG, None)
