"""Job operations used by the API *and* the worker. Every function takes a ``Session`` first and
commits its own change (so each call is one short transaction and its lock is released).

Race safety: on PostgreSQL the job row is locked with ``SELECT ... FOR UPDATE``; on SQLite every
transaction starts with ``BEGIN IMMEDIATE`` (see app.db.session), which serializes writers.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.security import decrypt_token
from app.db.base import utcnow
from app.db.models import TERMINAL_STATES, Artifact, HubToken, Job, JobEvent
from app.db.notify import job_ready

log = logging.getLogger("slimgpt.jobs")

_UNSET: Any = object()


def _extra(job_id: str) -> dict[str, str]:
    return {"job_id": job_id}


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def _lock_job(session: Session, job_id: str) -> Job | None:
    """The job row, locked for this transaction (FOR UPDATE on Postgres), refreshed."""
    stmt = select(Job).where(Job.id == job_id).with_for_update().execution_options(
        populate_existing=True
    )
    return session.scalars(stmt).first()


def _next_seq(session: Session, job_id: str) -> int:
    current = session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id))
    return int(current or 0) + 1


def _append_event(
    session: Session,
    job: Job,
    *,
    phase: str | None,
    message: str,
    layer: int | None = None,
    percent: float | None = None,
    metrics: dict[str, Any] | None = None,
    state: str | None = None,
) -> JobEvent:
    """Add an event to a job already locked in this transaction (caller commits)."""
    event = JobEvent(
        job_id=job.id,
        seq=_next_seq(session, job.id),
        time=utcnow(),
        state=state or job.state,
        phase=phase,
        layer=layer,
        percent=percent,
        message=message,
        metrics=metrics,
    )
    session.add(event)
    session.flush()
    return event


def try_claim(session: Session, job_id: str, worker_id: str,
              lease_seconds: float) -> tuple[Job | None, str]:
    """Take the job's lease for ``worker_id``, set it running and count an attempt.

    Succeeds for a queued job whose retry backoff has passed, and for a running job whose lease
    this worker already holds. Everything else is declined, with the reason: a terminal or
    unknown job, a job in its backoff, and a running job of another worker, live or not (a dead
    worker's job comes back through the sweeper, :func:`record_worker_lost`, never through a
    duplicate delivery). Returns ``(job, "")`` or ``(None, reason)``.
    """
    now = utcnow()
    job = _lock_job(session, job_id)
    if job is None:
        session.rollback()
        return None, "no such job"
    if job.state in TERMINAL_STATES:
        state = job.state
        session.rollback()
        return None, f"the job is {state}"
    if job.state == "running" and job.lease_owner != worker_id:
        owner = job.lease_owner
        session.rollback()
        return None, f"worker {owner} holds its lease"
    if job.state == "queued" and job.available_at is not None and job.available_at > now:
        wait = (job.available_at - now).total_seconds()
        session.rollback()
        return None, f"its retry backoff has {wait:.1f} s left"
    job.state = "running"
    job.lease_owner = worker_id
    job.lease_expires_at = now + timedelta(seconds=lease_seconds)
    job.last_worker = worker_id
    job.next_dispatch_at = None
    job.attempts = (job.attempts or 0) + 1
    if job.started_at is None:
        job.started_at = now
    _append_event(session, job, phase=job.phase if job.phase != "queued" else None,
                  message=f"claimed by worker {worker_id} (attempt {job.attempts})",
                  state="running")
    session.commit()
    log.info("job claimed by %s, attempt %d", worker_id, job.attempts, extra=_extra(job_id))
    return job, ""


def retry_in_place(session: Session, job_id: str, worker_id: str, lease_seconds: float,
                   message: str, metrics: dict[str, Any] | None = None) -> Job | None:
    """The worker holding the job's lease starts another attempt itself (a transient error):
    counts the attempt, renews the lease and records ``message``. Not a claim: nobody took the
    job over. None when the lease is no longer this worker's (then it must stop)."""
    job = _lock_job(session, job_id)
    if job is None or job.state != "running" or job.lease_owner != worker_id:
        session.rollback()
        return None
    job.attempts = (job.attempts or 0) + 1
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
    _append_event(session, job, phase=job.phase, message=f"{message} (attempt {job.attempts})",
                  state="running", metrics=metrics)
    session.commit()
    log.info("job retried in place by %s, attempt %d", worker_id, job.attempts,
             extra=_extra(job_id))
    return job


def claim_job(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> Job | None:
    """:func:`try_claim` without the reason."""
    return try_claim(session, job_id, worker_id, lease_seconds)[0]


def renew_lease(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> bool:
    """Extend the lease; False if the job is no longer running under this worker's lease."""
    job = _lock_job(session, job_id)
    if job is None or job.state != "running" or job.lease_owner != worker_id:
        session.rollback()
        return False
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
    session.commit()
    return True


def update_progress(
    session: Session,
    job_id: str,
    *,
    phase: str | None = None,
    layer: int | None = None,
    num_layers: int | None = None,
    percent: float | None = None,
    eta_s: float | None = None,
) -> None:
    """Set the given progress fields (None leaves a field as it is)."""
    job = _lock_job(session, job_id)
    if job is None:
        session.rollback()
        return
    _apply_progress(job, phase=phase, layer=layer, num_layers=num_layers, percent=percent,
                    eta_s=eta_s)
    session.commit()


def _apply_progress(job: Job, **fields: Any) -> None:
    for name, value in fields.items():
        if value is not None:
            setattr(job, name, value)


def add_event(
    session: Session,
    job_id: str,
    *,
    phase: str | None,
    message: str,
    layer: int | None = None,
    percent: float | None = None,
    metrics: dict[str, Any] | None = None,
    state: str | None = None,
    num_layers: int | None = None,
    eta_s: float | None = None,
) -> JobEvent:
    """Append an event with the next sequence number and update the job's progress fields."""
    job = _lock_job(session, job_id)
    if job is None:
        session.rollback()
        raise LookupError(f"job {job_id} does not exist")
    _apply_progress(job, phase=phase, layer=layer, num_layers=num_layers, percent=percent,
                    eta_s=eta_s)
    event = _append_event(session, job, phase=phase, message=message, layer=layer,
                          percent=percent, metrics=metrics, state=state)
    session.commit()
    return event


def is_cancel_requested(session: Session, job_id: str) -> bool:
    value = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    session.rollback()  # end the read transaction (SQLite holds a lock for it)
    return bool(value)


def finish_job(
    session: Session,
    job_id: str,
    state: str,
    *,
    metrics: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    message: str | None = None,
    worker_id: str | None = None,
) -> Job | None:
    """Move the job to a terminal state, write a final event and release the lease.

    Never overwrites an already-terminal job (returns it unchanged). Metrics are merged into
    the existing metrics. Returns None for an unknown job. With ``worker_id`` (a worker ending
    its own attempt) only a job running under that worker's lease is finished, else None is
    returned: a worker that lost its lease never ends the attempt of the worker that took over.
    """
    if state not in TERMINAL_STATES:
        raise ValueError(f"finish_job needs a terminal state, got {state!r}")
    job = _lock_job(session, job_id)
    if job is None:
        session.rollback()
        return None
    if worker_id is not None and (job.state != "running" or job.lease_owner != worker_id):
        session.rollback()
        log.warning("not finishing the job as %s: worker %s no longer holds its lease", state,
                    worker_id, extra=_extra(job_id))
        return None
    if job.state in TERMINAL_STATES:
        session.rollback()
        return job
    _finish_locked(session, job, state, metrics=metrics, result=result, error=error,
                   message=message)
    session.commit()
    log.info("job %s", state, extra=_extra(job_id))
    return job


def _finish_locked(
    session: Session,
    job: Job,
    state: str,
    *,
    metrics: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    message: str | None = None,
) -> None:
    now = utcnow()
    job.state = state
    job.finished_at = now
    job.lease_owner = None
    job.lease_expires_at = None
    job.next_dispatch_at = None
    job.eta_s = 0.0 if state == "succeeded" else None
    if state == "succeeded":
        job.percent = 100.0
    if metrics:
        job.metrics = {**(job.metrics or {}), **metrics}
    if result is not None:
        job.result = result
    if error is not None:
        job.error = error
    default_message = {"succeeded": "job succeeded", "failed": f"job failed: {error or 'error'}",
                       "cancelled": "job cancelled"}[state]
    _append_event(session, job, phase=job.phase, message=message or default_message,
                  percent=job.percent, metrics=metrics, state=state)


def request_cancel(session: Session, job_id: str) -> Job | None:
    """Cancel: a queued job is cancelled at once, a running one gets ``cancel_requested``."""
    job = _lock_job(session, job_id)
    if job is None:
        session.rollback()
        return None
    if job.state in TERMINAL_STATES:
        session.rollback()
        return job
    if job.state == "queued":
        _finish_locked(session, job, "cancelled", message="cancelled before it started")
        session.commit()
        log.info("job cancelled before it started", extra=_extra(job_id))
        return job
    if not job.cancel_requested:
        job.cancel_requested = True
        _append_event(session, job, phase=job.phase, message="cancel requested")
    session.commit()
    log.info("cancel requested", extra=_extra(job_id))
    return job


def host_of(worker_id: str | None) -> str:
    """The host part of a worker id (``host:pid:tag``)."""
    return (worker_id or "unknown").split(":", 1)[0] or "unknown"


def _where(job: Job) -> str:
    """Where the job was, for messages: ``at layer 17 of 30`` or ``during loading``."""
    if job.phase == "pruning" and job.layer is not None:
        return f"at layer {job.layer} of {job.num_layers}" if job.num_layers else \
            f"at layer {job.layer}"
    return f"during {job.phase}" if job.phase and job.phase != "queued" else "before it started"


def retry_delay_s(losses: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter before the retry that follows the ``losses``-th loss:
    uniformly in [d/2, d] with d = base * 2**(losses-1), capped at the maximum."""
    ceiling = min(settings.retry_backoff_max_s,
                  settings.retry_backoff_base_s * 2 ** max(0, losses - 1))
    return (rng or random).uniform(ceiling / 2, ceiling)


def record_worker_lost(
    session: Session,
    job_id: str,
    settings: Settings,
    *,
    reason: str,
    owner_prefix: str | None = None,
    expired_only: bool = False,
) -> Job | None:
    """The worker running ``job_id`` is gone: count the loss and give the job another attempt
    after a backoff, or fail it once SLIMGPT_JOB_MAX_ATTEMPTS attempts were lost.

    ``owner_prefix`` limits this to a lease held by that worker (``host:pid:``, as the Celery
    parent reports a dead child); ``expired_only`` to an expired lease (the sweeper). Returns the
    job when it was changed, else None. A job whose cancel was requested ends cancelled.
    """
    now = utcnow()
    job = _lock_job(session, job_id)
    if (job is None or job.state != "running"
            or (owner_prefix is not None and not (job.lease_owner or "").startswith(owner_prefix))
            or (expired_only and job.lease_expires_at is not None
                and job.lease_expires_at >= now)):
        session.rollback()
        return None
    owner = job.lease_owner or "unknown"
    host, where = host_of(owner), _where(job)
    job.lost_count = (job.lost_count or 0) + 1
    job.last_worker = owner
    job.last_error = f"{reason}; {where} on host {host}"
    job.lease_owner = None
    job.lease_expires_at = None
    max_attempts = settings.job_max_attempts
    if job.cancel_requested:
        _finish_locked(session, job, "cancelled",
                       message=f"job cancelled (its worker {owner} was lost: {reason})")
    elif job.lost_count >= max_attempts:
        times = "once" if job.lost_count == 1 else f"{job.lost_count} times"
        _finish_locked(session, job, "failed",
                       error=f"worker lost {times}; last {where} on host {host} ({reason})")
    else:
        delay = retry_delay_s(job.lost_count, settings)
        job.state = "queued"
        job.available_at = job.next_dispatch_at = now + timedelta(seconds=delay)
        _append_event(session, job, phase=job.phase, state="queued",
                      message=f"worker {owner} lost ({reason}) {where}; retrying in "
                      f"{delay:.1f} s (lost {job.lost_count} of {max_attempts} attempts)")
        job_ready(session)
    session.commit()
    log.warning("worker %s lost (%s): job %s", owner, reason, job.state, extra=_extra(job_id))
    return job


def hand_back(session: Session, job_id: str, worker_id: str, *, reason: str) -> bool:
    """The worker stops (SIGTERM) and gives the job back: queued again at once, so another worker
    resumes it from its checkpoints; this does not count as a lost attempt."""
    job = _lock_job(session, job_id)
    if job is None or job.state != "running" or job.lease_owner != worker_id:
        session.rollback()
        return False
    where = _where(job)
    job.state = "queued"
    job.lease_owner = None
    job.lease_expires_at = None
    job.available_at = None
    job.next_dispatch_at = utcnow()
    _append_event(session, job, phase=job.phase, state="queued",
                  message=f"handed back by worker {worker_id} ({reason}) {where}; the next "
                  "worker resumes it from its checkpoints")
    job_ready(session)
    session.commit()
    log.info("job handed back by %s (%s)", worker_id, reason, extra=_extra(job_id))
    return True


def expired_running_jobs(session: Session, now: datetime | None = None) -> list[str]:
    """Ids of running jobs whose lease has expired (for a sweeper)."""
    now = now or utcnow()
    ids = list(session.scalars(
        select(Job.id).where(Job.state == "running", Job.lease_expires_at < now)
    ))
    session.rollback()
    return ids


def add_artifact(session: Session, job_id: str, path: str | Path, size: int, sha256: str,
                 *, name: str | None = None) -> Artifact:
    """Record a file of the job's output. ``name`` (the download name) defaults to the path
    relative to the folder named after the job id when the path contains one, else the basename.
    Re-adding the same name updates the record (a resumed job may rewrite a file)."""
    p = Path(path)
    if name is None:
        parts = p.parts
        name = "/".join(parts[parts.index(job_id) + 1:]) if job_id in parts[:-1] else p.name
    existing = session.scalars(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    ).first()
    if existing is not None:
        existing.path, existing.size, existing.sha256 = str(p), int(size), sha256
        artifact = existing
    else:
        artifact = Artifact(job_id=job_id, name=name, path=str(p), size=int(size), sha256=sha256)
        session.add(artifact)
    session.commit()
    return artifact


def set_model_commit(session: Session, job_id: str, sha: str) -> None:
    """Record the Hub commit the worker resolved ``revision`` to."""
    job = _lock_job(session, job_id)
    if job is not None:
        job.model_commit_sha = sha
    session.commit()


def get_hub_token_for_job(session: Session, job_id: str, settings: Settings) -> str | None:
    """The decrypted Hub token of the job's tenant (worker only; never log or return it)."""
    row = session.execute(
        select(HubToken.ciphertext).join(Job, Job.tenant_id == HubToken.tenant_id)
        .where(Job.id == job_id)
    ).first()
    session.rollback()
    if row is None:
        return None
    return decrypt_token(settings.fernet_key(), row[0])


def list_events(session: Session, job_id: str, after_seq: int = 0, limit: int = 500) -> list[JobEvent]:
    return list(session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
        .order_by(JobEvent.seq).limit(limit)
    ))
