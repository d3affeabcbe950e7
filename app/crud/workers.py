"""The worker fleet: rows written by each worker's heartbeat thread, read by the dashboard and
the metrics. Every function commits its own short transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import TERMINAL_STATES, Job, Worker

#: A worker whose last heartbeat is older than this many heartbeat intervals is shown as lost.
LOST_AFTER_BEATS = 3
#: Rows of workers that stopped or vanished are deleted after this long.
FORGET_AFTER = timedelta(days=1)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker process says about itself when it registers."""

    id: str
    kind: str  # celery | embedded
    host: str
    pid: int
    queue: str | None
    gpu_name: str | None
    gpu_count: int
    gpu_memory_bytes: int | None
    build: dict[str, Any]


def register_worker(session: Session, info: WorkerInfo) -> Worker:
    """Insert the worker's row, or reset it when a process reuses the id (a restarted node)."""
    now = utcnow()
    fields: dict[str, Any] = {
        "kind": info.kind, "host": info.host, "pid": info.pid, "queue": info.queue,
        "gpu_name": info.gpu_name, "gpu_count": info.gpu_count,
        "gpu_memory_bytes": info.gpu_memory_bytes, "build": info.build,
        "current_job_id": None, "current_job_since": None, "jobs_done": 0, "started_at": now,
        "last_heartbeat_at": now, "stopped_at": None}
    row = session.get(Worker, info.id)
    if row is None:
        row = Worker(id=info.id, **fields)
        session.add(row)
        try:
            session.commit()
            return row
        except IntegrityError:  # registered concurrently under the same name: take it over
            session.rollback()
            row = session.get(Worker, info.id)
            assert row is not None
    for name, value in fields.items():
        setattr(row, name, value)
    session.commit()
    return row


def heartbeat(session: Session, worker_id: str, *, grace_s: float = 30.0) -> bool:
    """Mark the worker alive now, and let go of its current job once that job has ended
    (counted as done) or has sat in the queue for ``grace_s`` (handed back, or declined). The
    job process itself never writes after the job's final row, so its broker message is
    acknowledged right after it. False when the row is gone (then it registers again)."""
    now = utcnow()
    result = session.execute(update(Worker).where(Worker.id == worker_id)
                             .values(last_heartbeat_at=now, stopped_at=None))
    ended = select(Job.id).where(Job.id == Worker.current_job_id,
                                 Job.state.in_(TERMINAL_STATES)).exists()
    session.execute(update(Worker).where(Worker.id == worker_id, ended)
                    .values(current_job_id=None, current_job_since=None,
                            jobs_done=Worker.jobs_done + 1))
    waiting = select(Job.id).where(Job.id == Worker.current_job_id,
                                   Job.state == "queued").exists()
    session.execute(update(Worker).where(Worker.id == worker_id, waiting,
                                         Worker.current_job_since < now - timedelta(
                                             seconds=grace_s))
                    .values(current_job_id=None, current_job_since=None))
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def set_current_job(session: Session, worker_id: str, job_id: str) -> None:
    """The worker starts ``job_id`` (one job at a time: a previous job it still names has
    ended, and is counted if it finished)."""
    now = utcnow()
    row = session.get(Worker, worker_id)
    if row is None:
        session.rollback()
        return
    previous = row.current_job_id
    if previous is not None and previous != job_id:
        state = session.scalar(select(Job.state).where(Job.id == previous))
        if state in TERMINAL_STATES:
            row.jobs_done = (row.jobs_done or 0) + 1
    row.current_job_id, row.current_job_since = job_id, now
    row.last_heartbeat_at = now
    session.commit()


def mark_stopped(session: Session, worker_id: str) -> None:
    session.execute(update(Worker).where(Worker.id == worker_id)
                    .values(stopped_at=utcnow(), current_job_id=None, current_job_since=None))
    session.commit()


def forget_old_workers(session: Session, now: datetime | None = None) -> int:
    """Delete rows of workers not heard from for FORGET_AFTER."""
    cutoff = (now or utcnow()) - FORGET_AFTER
    result = session.execute(delete(Worker).where(Worker.last_heartbeat_at < cutoff))
    session.commit()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def worker_status(row: Worker, heartbeat_s: float, now: datetime | None = None,
                  job_state: str | None = None) -> str:
    """``busy``, ``idle``, ``stopped`` or ``lost`` (no heartbeat for LOST_AFTER_BEATS beats).
    ``job_state``: the state of the row's current job; busy only while it runs (the heartbeat
    lets go of an ended job within one beat)."""
    now = now or utcnow()
    if row.stopped_at is not None:
        return "stopped"
    if (now - row.last_heartbeat_at).total_seconds() > LOST_AFTER_BEATS * heartbeat_s:
        return "lost"
    return "busy" if row.current_job_id is not None and job_state == "running" else "idle"


def list_workers_with_jobs(session: Session) -> list[tuple[Worker, Job | None]]:
    """Every worker row with the job it names (outer join), by host."""
    return [(w, j) for w, j in session.execute(
        select(Worker, Job).outerjoin(Job, Job.id == Worker.current_job_id)
        .order_by(Worker.host, Worker.id))]
