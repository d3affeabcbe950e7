"""One Server-Sent Event stream for all of a tenant's jobs (the dashboard's live view, and
``GET /v1/events`` for scripts), read from the event table.

Events are ordered by their global id. On PostgreSQL ids are taken at insert but become visible
at commit, so a smaller id can appear after a larger one was sent; the cursor remembers such
holes for a few seconds and asks for them again, so nothing is skipped (an id whose insert
rolled back stays a hole until it expires).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.db.models import Job, JobEvent

#: How long a missing event id is asked for again before it counts as rolled back.
HOLE_WAIT_S = 10.0
MAX_HOLES = 10_000
BATCH = 500


def job_snapshot(job: Job) -> dict[str, Any]:
    """What a list row or a page header needs to show a job, at the time of reading."""
    request = job.request or {}
    return {
        "id": job.id, "state": job.state, "phase": job.phase, "layer": job.layer,
        "num_layers": job.num_layers, "percent": job.percent, "eta_s": job.eta_s,
        "cancel_requested": job.cancel_requested, "model_id": job.model_id,
        "target_ratio": request.get("target_ratio"), "submitted_by": job.submitted_by,
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at), "error": job.error,
    }


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def event_message(ev: JobEvent, job: Job) -> dict[str, Any]:
    return {
        "id": ev.id, "job_id": ev.job_id, "seq": ev.seq, "time": _iso(ev.time),
        "state": ev.state, "phase": ev.phase, "layer": ev.layer, "percent": ev.percent,
        "message": ev.message, "metrics": ev.metrics, "job": job_snapshot(job),
    }


class EventCursor:
    """Which event ids a stream has delivered: everything up to ``last`` except ``holes``."""

    def __init__(self, after: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.last = after
        self.holes: dict[int, float] = {}
        self.clock = clock

    def advance(self, event_id: int) -> None:
        now = self.clock()
        if event_id in self.holes:
            del self.holes[event_id]
            return
        if event_id > self.last + 1 and len(self.holes) < MAX_HOLES:
            for missing in range(self.last + 1, min(event_id, self.last + 1 + MAX_HOLES)):
                self.holes[missing] = now
        self.last = max(self.last, event_id)

    def settle(self, existing: set[int]) -> None:
        """Drop holes that turned out to be other tenants' events, and expired ones."""
        cutoff = self.clock() - HOLE_WAIT_S
        self.holes = {i: t for i, t in self.holes.items() if i not in existing and t >= cutoff}


def poll_events(session: Session, tenant_id: str, cursor: EventCursor,
                job_id: str | None = None) -> list[dict[str, Any]]:
    """New events of the tenant's jobs (optionally one job), advancing ``cursor``."""
    wanted = JobEvent.id > cursor.last
    if cursor.holes:
        wanted = or_(wanted, JobEvent.id.in_(sorted(cursor.holes)))
    stmt = (select(JobEvent, Job).join(Job, Job.id == JobEvent.job_id)
            .where(Job.tenant_id == tenant_id, wanted).order_by(JobEvent.id).limit(BATCH))
    if job_id is not None:
        stmt = stmt.where(JobEvent.job_id == job_id)
    out = []
    for ev, job in session.execute(stmt):
        cursor.advance(ev.id)
        out.append(event_message(ev, job))
    if cursor.holes:
        existing = set(session.scalars(select(JobEvent.id).where(
            JobEvent.id.in_(sorted(cursor.holes)))))
        cursor.settle(existing)
    session.rollback()
    return out


def latest_event_id(session: Session) -> int:
    """Where a page rendered now should start its stream."""
    from sqlalchemy import func

    value = session.scalar(select(func.max(JobEvent.id)))
    session.rollback()
    return int(value or 0)


async def sse(
    *,
    session_factory: Callable[[], Session],
    tenant_id: str,
    after: int,
    poll_s: float,
    heartbeat_s: float,
    is_disconnected: Callable[[], Awaitable[bool]],
    still_allowed: Callable[[], bool] | None = None,
    recheck_s: float | None = None,
    job_id: str | None = None,
) -> AsyncIterator[str]:
    """The stream's text. Runs until the client leaves or ``still_allowed`` says no (a revoked
    key or an expired session), checked every ``recheck_s`` (default: two heartbeats, at most
    30 s)."""
    cursor = EventCursor(after)
    if recheck_s is None:
        recheck_s = min(30.0, max(poll_s, 2 * heartbeat_s))

    def poll() -> list[dict[str, Any]]:
        with session_factory() as s:
            return poll_events(s, tenant_id, cursor, job_id)

    yield "retry: 3000\n\n"
    beat = checked = time.monotonic()
    # The SSE id only grows, so a reconnect (Last-Event-ID) resumes after everything sent even
    # when a late-committed event with a smaller id went out after a larger one.
    sent_id = after
    while True:
        if still_allowed is not None and time.monotonic() - checked >= recheck_s:
            checked = time.monotonic()
            if not await run_in_threadpool(still_allowed):
                yield 'event: end\ndata: {"reason": "session ended"}\n\n'
                return
        events = await run_in_threadpool(poll)
        for ev in events:
            sent_id = max(sent_id, ev["id"])
            yield f"id: {sent_id}\nevent: job\ndata: {json.dumps(ev, default=str)}\n\n"
        if events:
            beat = time.monotonic()
        elif time.monotonic() - beat >= heartbeat_s:
            yield ": heartbeat\n\n"
            beat = time.monotonic()
        if await is_disconnected():
            return
        if len(events) < BATCH:
            await asyncio.sleep(poll_s)
