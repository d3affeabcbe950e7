"""Per-tenant limits: request rate, queued jobs, upload bytes. Over a limit: 429 + Retry-After.

All three are kept in the database, not in Redis: the database is already on every request's
path (the API key is looked up there), so a limit adds no dependency and no failure mode of its
own; submissions keep not depending on the broker; every API replica shares the same counts
exactly; and the embedded mode (SQLite, no Redis) runs the same code. The price is one small
write per request (an upsert of one row per tenant), which the job API's request rates afford.

* Request rate: the generic cell rate algorithm (a token bucket kept as one timestamp). A tenant
  may send ``SLIMGPT_RATE_LIMIT_BURST`` requests at once, then one every
  ``60 / SLIMGPT_RATE_LIMIT_PER_MINUTE`` seconds. Each request moves the tenant's row forward
  with one atomic ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` (Postgres and SQLite), so
  concurrent requests on several replicas never overrun it. Time is the API host's clock
  (replicas are assumed NTP-synchronized; a skew of s seconds shifts a tenant's budget by s).
* Queued jobs: counted in the submission's own transaction, with the tenant's row locked, so
  concurrent submissions cannot pass the limit together.
* Upload bytes: the sizes of the tenant's uploads of the last 24 hours, checked before the body
  is read (Content-Length), while it streams, and once more when the upload is recorded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta

from fastapi import HTTPException
from sqlalchemy import case, func, select, text
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import Job, RateLimit, Tenant, UploadedFile

REQUESTS = "requests"
#: A full queue drains as fast as GPUs finish jobs, which the API cannot know: a hint.
QUEUE_FULL_RETRY_AFTER_S = 30
UPLOAD_WINDOW = timedelta(days=1)


def too_many(detail: str, retry_after_s: float) -> HTTPException:
    seconds = max(1, math.ceil(retry_after_s))
    return HTTPException(429, detail=f"{detail}; retry in {seconds} s",
                         headers={"Retry-After": str(seconds)})


def _insert(session: Session):  # type: ignore[no-untyped-def]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the service supports these two
        raise RuntimeError(f"no rate limiting on {dialect}")
    return insert


def check_request_rate(session: Session, tenant_id: str, settings: Settings,
                       now: float | None = None) -> None:
    """Count one request of the tenant; 429 when it is over its rate. Commits."""
    per_minute = settings.rate_limit_per_minute
    if not per_minute:
        return
    now = time.time() if now is None else now
    interval = 60.0 / per_minute
    tolerance = settings.rate_limit_burst * interval
    # The bucket is "full" when tat <= now; each request pushes tat one interval on, and a
    # request is refused when that would put tat more than the burst's worth ahead of now.
    start = case((RateLimit.tat > now, RateLimit.tat), else_=now)
    stmt = _insert(session)(RateLimit).values(tenant_id=tenant_id, name=REQUESTS,
                                              tat=now + interval)
    stmt = stmt.on_conflict_do_update(
        index_elements=[RateLimit.tenant_id, RateLimit.name],
        set_={"tat": start + interval},
        where=start + interval - now <= tolerance,
    ).returning(RateLimit.tat)
    try:
        if session.get_bind().dialect.name == "postgresql":
            # A counter, not data: losing the last increments in a crash is harmless, so the
            # commit need not wait for the WAL flush (that wait doubled a request's latency).
            session.execute(text("SET LOCAL synchronous_commit = off"))
        allowed = session.execute(stmt).first() is not None
        tat = None if allowed else session.scalar(
            select(RateLimit.tat).where(RateLimit.tenant_id == tenant_id,
                                        RateLimit.name == REQUESTS))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    if not allowed:
        wait = (tat or now) + interval - tolerance - now
        raise too_many(f"rate limit of {per_minute} requests per minute for this tenant "
                       "exceeded", wait)


def check_queued_jobs(session: Session, tenant_id: str, settings: Settings) -> None:
    """429 when the tenant already has its limit of queued jobs. Call inside the transaction
    that inserts the job: it locks the tenant's row until that commits."""
    limit = settings.max_queued_jobs_per_tenant
    if not limit:
        return
    # FOR NO KEY UPDATE: serializes the tenant's submissions (SQLite's BEGIN IMMEDIATE already
    # serializes every write) without blocking the foreign-key checks of other writes.
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id)
                    .with_for_update(key_share=True))
    queued = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.state == "queued")) or 0
    if queued >= limit:
        raise too_many(f"this tenant has {queued} queued jobs, the limit is {limit}",
                       QUEUE_FULL_RETRY_AFTER_S)


def _recent_uploads(session: Session, tenant_id: str) -> list[tuple[float, int]]:
    since = utcnow() - UPLOAD_WINDOW
    rows = session.execute(select(UploadedFile.created_at, UploadedFile.size).where(
        UploadedFile.tenant_id == tenant_id, UploadedFile.created_at > since)
        .order_by(UploadedFile.created_at)).all()
    return [(created.timestamp(), int(size)) for created, size in rows]


@dataclass(frozen=True)
class UploadAllowance:
    """A tenant's upload budget: ``limit`` bytes per 24 hours, ``uploads`` (time, size) of the
    last 24 hours, oldest first."""

    limit: int
    uploads: list[tuple[float, int]]

    @property
    def remaining(self) -> int:
        return self.limit - sum(size for _, size in self.uploads)

    def refusal(self, incoming: int) -> HTTPException:
        """429, retry when enough of the window's uploads have aged out for ``incoming``."""
        window = UPLOAD_WINDOW.total_seconds()
        used, retry = self.limit - self.remaining, window
        for created, size in self.uploads:
            used -= size
            if used + max(incoming, 1) <= self.limit:
                retry = created + window - time.time()
                break
        return too_many(f"upload limit of {self.limit} bytes per 24 hours for this tenant "
                        "reached", retry)


def upload_allowance(session: Session, tenant_id: str, settings: Settings,
                     declared: int | None = None) -> UploadAllowance | None:
    """The tenant's upload budget (None: no limit); 429 when it is spent, or smaller than a
    ``declared`` Content-Length. Ends its read transaction."""
    if not settings.upload_bytes_per_day:
        return None
    allowance = UploadAllowance(settings.upload_bytes_per_day,
                                _recent_uploads(session, tenant_id))
    session.rollback()
    if allowance.remaining <= 0 or (declared is not None and declared > allowance.remaining):
        raise allowance.refusal(declared or 1)
    return allowance


def check_upload_total(session: Session, tenant_id: str, settings: Settings, size: int) -> None:
    """Before recording an upload of ``size`` bytes: 429 if, with the uploads that finished
    meanwhile, it goes over the limit. Locks the tenant's row until the caller commits."""
    if not settings.upload_bytes_per_day:
        return
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id)
                    .with_for_update(key_share=True))
    allowance = UploadAllowance(settings.upload_bytes_per_day,
                                _recent_uploads(session, tenant_id))
    if size > allowance.remaining:
        raise allowance.refusal(size)
