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
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import or_, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from app.db.models import Job, JobEvent

log = logging.getLogger("slimgpt.streams")
DATABASE_ERRORS = (OperationalError, InterfaceError)

#: How long a missing event id is asked for again before it counts as rolled back.
HOLE_WAIT_S = 10.0
MAX_HOLES = 10_000
#: Event ids read per poll (all tenants); a stream that is behind polls again at once.
SCAN = 2000


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
    """Which event ids (of all tenants) a reader has seen: everything up to ``last`` except
    ``holes``, ids skipped because they were not committed yet."""

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

    def expire(self) -> None:
        """Forget holes older than HOLE_WAIT_S: their inserts were rolled back."""
        cutoff = self.clock() - HOLE_WAIT_S
        self.holes = {i: t for i, t in self.holes.items() if t >= cutoff}

    def new_ids(self, session: Session, limit: int = SCAN) -> list[int]:
        """Ids committed since the last call (all tenants), oldest first, advancing the cursor.

        A single-table scan of the primary key: its plan does not depend on how many events
        a tenant has (joining first let Postgres start from the tenant's jobs under a generic
        plan, 100x slower on a long history)."""
        wanted = JobEvent.id > self.last
        if self.holes:
            wanted = or_(wanted, JobEvent.id.in_(sorted(self.holes)))
        ids = list(session.scalars(select(JobEvent.id).where(wanted).order_by(JobEvent.id)
                                   .limit(limit)))
        for event_id in ids:
            self.advance(event_id)
        self.expire()
        return ids


def poll_events(session: Session, tenant_id: str, cursor: EventCursor,
                job_id: str | None = None) -> list[dict[str, Any]]:
    """New events of the tenant's jobs (optionally one job), advancing ``cursor``."""
    ids = cursor.new_ids(session)
    out: list[dict[str, Any]] = []
    if ids:
        stmt = (select(JobEvent, Job).join(Job, Job.id == JobEvent.job_id)
                .where(JobEvent.id.in_(ids), Job.tenant_id == tenant_id)
                .order_by(JobEvent.id))
        if job_id is not None:
            stmt = stmt.where(JobEvent.job_id == job_id)
        out = [event_message(ev, job) for ev, job in session.execute(stmt)]
    session.rollback()
    return out


def latest_event_id(session: Session) -> int:
    """Where a page rendered now should start its stream."""
    from sqlalchemy import func

    value = session.scalar(select(func.max(JobEvent.id)))
    session.rollback()
    return int(value or 0)


def _frame(data: str | None = None, **fields: Any) -> str:
    """One SSE message, framed by sse-starlette (LF line ends, as the job stream's)."""
    from sse_starlette import ServerSentEvent

    return ServerSentEvent(data, sep="\n", **fields).encode().decode()


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

    yield _frame(retry=3000)
    beat = checked = time.monotonic()
    failing_since: float | None = None
    last_seen = after
    # The SSE id only grows, so a reconnect (Last-Event-ID) resumes after everything sent even
    # when a late-committed event with a smaller id went out after a larger one.
    sent_id = after
    while True:
        if still_allowed is not None and time.monotonic() - checked >= recheck_s:
            checked = time.monotonic()
            try:
                allowed = await run_in_threadpool(still_allowed)
            except DATABASE_ERRORS:
                allowed = True  # unknown for now: asked again at the next recheck
            if not allowed:
                yield _frame('{"reason": "session ended"}', event="end")
                return
        try:
            events = await run_in_threadpool(poll)
            failing_since = None
        except DATABASE_ERRORS:
            # A busy (SQLite: locked) or briefly unreachable database: the stream has started,
            # so it cannot turn into a 503; it keeps its place and tries again. Past the
            # heartbeat interval of failures it ends, and the browser reconnects.
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > max(heartbeat_s, 5.0):
                log.warning("event stream ends: the database has not answered for %.0f s",
                            now - failing_since)
                return
            events = []
        for ev in events:
            sent_id = max(sent_id, ev["id"])
            yield _frame(json.dumps(ev, default=str), id=str(sent_id), event="job")
        if events:
            beat = time.monotonic()
        elif time.monotonic() - beat >= heartbeat_s:
            yield _frame(comment="heartbeat")
            beat = time.monotonic()
        if await is_disconnected():
            return
        if cursor.last == last_seen:  # caught up: wait for news
            await asyncio.sleep(poll_s)
        last_seen = cursor.last
