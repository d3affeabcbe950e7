"""The outbox side of the job table: which queued jobs the dispatcher sends to the broker and
when, and which one the embedded worker takes next.

A queued job is due for sending once ``next_dispatch_at`` has passed: at once after it is
submitted or handed back, after its backoff after a lost worker, and again, later and later,
while nobody claims it (a message may be lost: a broker restart without persistence, a worker
that died between taking the message and claiming the job). Sending it twice is harmless: the
lease decides who runs (``app.crud.jobs.try_claim``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Job

#: A queued job nobody claims is sent again after SLIMGPT_REPUBLISH_AFTER_S, then after twice
#: that, and so on up to this (or SLIMGPT_REPUBLISH_AFTER_S when that is longer).
REPUBLISH_MAX_S = 3600.0


@dataclass(frozen=True)
class Due:
    """A job to send, as read (``next_dispatch_at`` guards the mark against a concurrent
    requeue: a job handed back meanwhile stays due)."""

    job: Job
    next_dispatch_at: datetime
    dispatch_count: int


def republish_delay_s(dispatch_count: int, settings: Settings) -> float:
    """How long after its ``dispatch_count``-th sending a still-queued job is sent again."""
    base = settings.republish_after_s
    return min(max(base, REPUBLISH_MAX_S), base * 2 ** max(0, dispatch_count - 1))


def due_for_dispatch(session: Session, now: datetime, limit: int) -> list[Due]:
    rows = list(session.scalars(
        select(Job).where(Job.state == "queued", Job.next_dispatch_at.is_not(None),
                          Job.next_dispatch_at <= now)
        .order_by(Job.next_dispatch_at, Job.created_at).limit(limit)
    ))
    session.rollback()
    return [Due(job, job.next_dispatch_at, job.dispatch_count or 0)  # type: ignore[arg-type]
            for job in rows]


def mark_dispatched(session: Session, sent: Collection[Due], now: datetime,
                    settings: Settings) -> int:
    """Record the sending; returns how many rows were still as read (the others stay due)."""
    marked = 0
    for due in sent:
        count = due.dispatch_count + 1
        result = session.execute(
            update(Job)
            .where(Job.id == due.job.id, Job.state == "queued",
                   Job.next_dispatch_at == due.next_dispatch_at)
            .values(dispatched_at=now, dispatch_count=count,
                    next_dispatch_at=now + timedelta(seconds=republish_delay_s(count, settings)))
        )
        marked += result.rowcount or 0  # type: ignore[attr-defined]
    session.commit()
    return marked


def seconds_to_next_dispatch(session: Session, now: datetime) -> float | None:
    """Seconds until the earliest queued job falls due (0 if one is due), None if none waits."""
    earliest = session.scalar(select(func.min(Job.next_dispatch_at)).where(
        Job.state == "queued", Job.next_dispatch_at.is_not(None)))
    session.rollback()
    if earliest is None:
        return None
    return max(0.0, (earliest - now).total_seconds())


def redispatch_all(session: Session, now: datetime) -> int:
    """Make every claimable queued job due now (the broker lost its messages)."""
    result = session.execute(
        update(Job)
        .where(Job.state == "queued",
               or_(Job.available_at.is_(None), Job.available_at <= now),
               or_(Job.next_dispatch_at.is_(None), Job.next_dispatch_at > now))
        .values(next_dispatch_at=now)
    )
    session.commit()
    return result.rowcount or 0  # type: ignore[attr-defined]


def expired_leases(session: Session, now: datetime, limit: int = 100) -> list[str]:
    """Running jobs whose lease has expired: their worker stopped renewing it."""
    ids = list(session.scalars(
        select(Job.id).where(Job.state == "running", Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at).limit(limit)
    ))
    session.rollback()
    return ids


def next_claimable_job(session: Session, now: datetime,
                       exclude: Collection[str] = ()) -> str | None:
    """The oldest queued job past its backoff (the embedded worker's queue)."""
    stmt = select(Job.id).where(
        Job.state == "queued", or_(Job.available_at.is_(None), Job.available_at <= now))
    if exclude:
        stmt = stmt.where(Job.id.not_in(list(exclude)))
    job_id = session.scalar(stmt.order_by(Job.created_at, Job.id).limit(1))
    session.rollback()
    return job_id


def seconds_to_next_claimable(session: Session, now: datetime) -> float | None:
    """Seconds until the earliest queued job in backoff becomes claimable."""
    earliest = session.scalar(select(func.min(Job.available_at)).where(
        Job.state == "queued", Job.available_at > now))
    session.rollback()
    return None if earliest is None else max(0.0, (earliest - now).total_seconds())
