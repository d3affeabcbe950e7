"""/v1/jobs: submit, list, inspect, cancel, events (SSE), artifacts."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.api.errors import DATABASE_UNAVAILABLE, ApiProblem
from app.api.limits import check_queued_jobs
from app.api.resolve import check_local_family, resolve_model
from app.core.faults import crash_point
from app.crud import jobs as crud
from app.crud.files import get_file
from app.crud.tenants import api_key_active, get_hub_token_row
from app.db.base import utcnow
from app.db.models import TERMINAL_STATES, Artifact, Job, JobEvent, Tenant
from app.db.notify import job_ready
from app.schemas import (
    UUID_RE,
    ArtifactList,
    ArtifactOut,
    ErrorOut,
    EventOut,
    IsoDateTime,
    JobCreate,
    JobList,
    JobOut,
    Progress,
)

log = logging.getLogger("slimgpt.api.jobs")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

NOT_FOUND = {404: {"model": ErrorOut, "description": "no such job for this API key"}}
#: How long an SSE client waits before reconnecting (the stream's `retry:` field).
SSE_RETRY_MS = 3000
#: Event sequence numbers are 32-bit integers in the database.
MAX_EVENT_SEQ = 2**31 - 1


def job_out(job: Job) -> JobOut:
    duration = None
    if job.started_at is not None:
        end = job.finished_at or utcnow()
        duration = round((end - job.started_at).total_seconds(), 3)
    return JobOut(
        id=job.id,
        state=job.state,  # type: ignore[arg-type]
        cancel_requested=job.cancel_requested,
        model_id=job.model_id,
        model_source=job.model_source,  # type: ignore[arg-type]
        revision=job.revision,
        model_commit_sha=job.model_commit_sha,
        progress=Progress(phase=job.phase, layer=job.layer, num_layers=job.num_layers,
                          percent=job.percent, eta_s=job.eta_s),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        duration_s=duration,
        attempts=job.attempts,
        metrics=job.metrics,
        result=job.result,
        error=job.error,
        error_code=job_error_code(job),
        request=job.request,
        links={
            "self": f"/v1/jobs/{job.id}",
            "events": f"/v1/jobs/{job.id}/events",
            "artifacts": f"/v1/jobs/{job.id}/artifacts",
            "cancel": f"/v1/jobs/{job.id}/cancel",
        },
    )


_CODE_PREFIX = re.compile(r"^([a-z][a-z0-9_]{1,63}): ")


def job_error_code(job: Job) -> str | None:
    """The machine-readable code of a failed job: the worker's (``code: message``, also in
    ``metrics.error_code``); a job whose workers kept dying is ``worker_lost``."""
    if job.state != "failed":
        return None
    code = (job.metrics or {}).get("error_code") if isinstance(job.metrics, dict) else None
    if isinstance(code, str) and code:
        return code
    m = _CODE_PREFIX.match(job.error or "")
    if m:
        return m.group(1)
    if (job.error or "").startswith("worker lost"):
        return "worker_lost"
    return "internal_error"


def tenant_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = session.get(Job, job_id) if UUID_RE.match(job_id) else None
    if job is None or job.tenant_id != tenant.id:
        raise HTTPException(404, detail=f"job {job_id} not found")
    return job


def _body_hash(normalized: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(normalized, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def _replay(existing: Job, body_hash: str) -> JSONResponse:
    if existing.body_hash != body_hash:
        raise ApiProblem(
            409, "Idempotency-Key was already used with a different request body",
            code="idempotency_conflict")
    return JSONResponse(status_code=202, content=job_out(existing).model_dump(mode="json"),
                        headers={"Idempotent-Replayed": "true", "Location": f"/v1/jobs/{existing.id}"})


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses={409: {"model": ErrorOut, "description": "Idempotency-Key reused with another body"},
               422: {"model": ErrorOut, "description": "invalid request"}},
    summary="Submit a pruning job",
)
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", min_length=1, max_length=255,
        description="same key + same body = same job; same key + other body = 409")] = None,
) -> Any:
    problem = request.app.state.cannot_run_jobs
    if problem:
        raise ApiProblem(503, problem, code="cannot_run_jobs")
    source, local_path = resolve_model(settings, body.model_id)
    if local_path is not None:
        check_local_family(local_path)
    _check_resources(body, settings, local_path)
    calibration_path = eval_path = None
    if UUID_RE.match(body.calibration.source):
        f = get_file(session, tenant.id, body.calibration.source)
        if f is None:
            raise HTTPException(
                422, detail=f"calibration.source: no uploaded file {body.calibration.source}")
        calibration_path = f.path
    if body.evaluate.eval_source and UUID_RE.match(body.evaluate.eval_source):
        f = get_file(session, tenant.id, body.evaluate.eval_source)
        if f is None:
            raise HTTPException(
                422, detail=f"evaluate.eval_source: no uploaded file {body.evaluate.eval_source}")
        eval_path = f.path
    if body.destination.hub_repo_id and get_hub_token_row(session, tenant.id) is None:
        raise HTTPException(
            422, detail="destination.hub_repo_id needs a Hugging Face token: PUT /v1/hub-token first")
    session.rollback()

    normalized = body.model_dump(mode="json")
    body_hash = _body_hash(normalized)
    if idempotency_key is not None:
        existing = session.scalars(select(Job).where(
            Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key)).first()
        if existing is not None:
            return _replay(existing, body_hash)

    check_queued_jobs(session, tenant.id, settings)  # locks the tenant's row until the commit
    now = utcnow()
    job = Job(
        tenant_id=tenant.id,
        state="queued",
        model_id=body.model_id,
        model_source=source,
        local_model_path=str(local_path) if local_path else None,
        revision=body.revision,
        calibration_path=calibration_path,
        eval_path=eval_path,
        request=normalized,
        idempotency_key=idempotency_key,
        body_hash=body_hash,
        submitted_by=getattr(request.state, "api_key_id", None),
        phase="queued",
        percent=0.0,
        created_at=now,
        # The outbox: the dispatcher sends the job once this commits (app/dispatcher.py).
        next_dispatch_at=now,
    )
    session.add(job)
    try:
        session.flush()
        session.add(JobEvent(job_id=job.id, seq=1, time=job.created_at, state="queued",
                             phase="queued", message="job accepted", percent=0.0))
        job_ready(session)
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        existing = session.scalars(select(Job).where(
            Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key)).first()
        if existing is None:
            raise
        return _replay(existing, body_hash)

    # Committed: the job is safe. Nothing here talks to the broker, so a dead or hung Redis
    # cannot fail or slow a submission; the dispatcher sends it.
    crash_point("after_commit")
    log.info("job accepted for %s (%s)", body.model_id, source, extra={"job_id": job.id})
    request.app.state.metrics.jobs_submitted.inc()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)


def _check_resources(body: JobCreate, settings: Any, local_path: Path | None) -> None:
    """Refuse (422) a job that no worker pool can run, with the estimates that say why."""
    from app.routing import NoWorkerPool, local_config, pools_from_settings, route

    try:
        route(body.model_dump(mode="json"), pools_from_settings(settings),
              local_config(local_path))
    except NoWorkerPool as err:
        raise ApiProblem(422, f"resources: {err}", code="no_worker_pool",
                         extensions={"estimates": err.estimates}) from None


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _utc(value: datetime, name: str) -> datetime:
    """``value`` in UTC (naive = UTC); a date that has no UTC equivalent (year 1 at +14:00,
    year 9999 at -14:00) is a 422, not an overflow deep in the database driver."""
    try:
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(
            tzinfo=timezone.utc)
    except OverflowError:
        raise HTTPException(422, detail=f"{name}: date is out of range") from None


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        created_at = datetime.fromisoformat(created)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise HTTPException(422, detail="cursor: invalid pagination cursor") from None
    if not isinstance(job_id, str) or not UUID_RE.match(job_id):
        raise HTTPException(422, detail="cursor: invalid pagination cursor")
    return _utc(created_at, "cursor"), job_id


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(
    tenant: TenantDep,
    session: SessionDep,
    state: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                     Query()] = None,
    model_id: Annotated[str | None, Query(max_length=512, pattern=r"^[^\x00]*$")] = None,
    created_after: Annotated[IsoDateTime | None, Query()] = None,
    created_before: Annotated[IsoDateTime | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobList:
    stmt = select(Job).where(Job.tenant_id == tenant.id)
    if state:
        stmt = stmt.where(Job.state == state)
    if model_id:
        stmt = stmt.where(Job.model_id == model_id)
    if created_after:
        stmt = stmt.where(Job.created_at >= _utc(created_after, "created_after"))
    if created_before:
        stmt = stmt.where(Job.created_at < _utc(created_before, "created_before"))
    if cursor:
        c_time, c_id = _decode_cursor(cursor)
        stmt = stmt.where(or_(Job.created_at < c_time,
                              and_(Job.created_at == c_time, Job.id < c_id)))
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc())
                                .limit(limit + 1)))
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return JobList(items=[job_out(j) for j in rows[:limit]], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND, summary="A job's state")
def get_job(job_id: str, tenant: TenantDep, session: SessionDep) -> JobOut:
    return job_out(tenant_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, status_code=202,
             responses={**NOT_FOUND, 409: {"model": ErrorOut}}, summary="Cancel a job")
def cancel_job(job_id: str, tenant: TenantDep, session: SessionDep) -> JobOut:
    job = tenant_job(session, tenant, job_id)
    if job.state in ("succeeded", "failed"):
        raise ApiProblem(409, f"job already {job.state}; nothing to cancel", code="job_finished")
    session.rollback()
    job = crud.request_cancel(session, job_id)
    assert job is not None
    return job_out(job)


def _event_dict(ev: JobEvent) -> dict[str, Any]:
    return EventOut.model_validate(ev, from_attributes=True).model_dump(mode="json")


def _sse(data: Any = None, **fields: Any) -> ServerSentEvent:
    # LF line ends (sse-starlette defaults to CRLF): the framing every earlier client saw.
    return ServerSentEvent(data, sep="\n", **fields)


def _last_event_id(request: Request, query_value: int | None) -> int:
    header = request.headers.get("last-event-id")
    if header is not None and header.strip():
        try:
            value = int(header.strip())
        except ValueError:
            raise HTTPException(422, detail="Last-Event-ID must be an event sequence number") from None
        if not 0 <= value <= MAX_EVENT_SEQ:
            raise HTTPException(
                422, detail=f"Last-Event-ID must be an event sequence number in [0, {MAX_EVENT_SEQ}]")
        return value
    return query_value or 0


@router.get(
    "/{job_id}/events",
    response_model=list[EventOut],
    responses={**NOT_FOUND, 200: {
        "content": {"text/event-stream": {"schema": {
            "type": "object",
            "description": "One Server-Sent Event: `retry` once first; then `progress` and "
            "`state` (terminal) events whose `id` is the event's `seq` and whose `data` is an "
            "EventOut as JSON; `: heartbeat` comments while nothing happens; last an `end` "
            "event with `{\"state\": ...}`",
            "properties": {
                "event": {"type": "string", "enum": ["progress", "state", "end"]},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "data": {"type": "string", "contentMediaType": "application/json"},
                "retry": {"type": "integer"},
            }}}},
        "description": "Server-Sent Events; with `Accept: application/json` (and not "
        "text/event-stream), the events so far as a JSON list"}},
    summary="Live job events (Server-Sent Events), resumable with Last-Event-ID",
)
def job_events(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    last_event_id: Annotated[int | None, Query(
        ge=0, le=MAX_EVENT_SEQ, description="like the Last-Event-ID header")] = None,
) -> Any:
    job = tenant_job(session, tenant, job_id)
    after = _last_event_id(request, last_event_id)
    accept = request.headers.get("accept", "")
    if "application/json" in accept and "text/event-stream" not in accept:
        return [_event_dict(e) for e in crud.list_events(session, job.id, after, limit=10_000)]
    session.rollback()
    factory = request.app.state.session_factory
    settings = request.app.state.settings

    key_id: str | None = getattr(request.state, "api_key_id", None)

    def poll(after_seq: int, check_key: bool) -> tuple[str | None, list[dict[str, Any]], bool]:
        with factory() as s:
            state = s.scalar(select(Job.state).where(Job.id == job_id))  # state first, see below
            events = [_event_dict(e) for e in crud.list_events(s, job_id, after_seq)]
            revoked = check_key and key_id is not None and not api_key_active(s, key_id)
            return state, events, revoked

    async def stream() -> AsyncIterator[ServerSentEvent]:
        # The state is read before the events: finish_job commits the final event together with
        # the terminal state, so once a terminal state is seen the events query has them all.
        # Heartbeats (comments) come from sse-starlette's ping; it also ends this generator when
        # the client disconnects.
        last = after
        yield _sse(retry=SSE_RETRY_MS)
        key_checked = time.monotonic()
        while True:
            # The key is checked again once per heartbeat period: a revoked key ends the stream.
            check_key = time.monotonic() - key_checked >= settings.sse_heartbeat_s
            try:
                state, events, revoked = await run_in_threadpool(poll, last, check_key)
            except DATABASE_UNAVAILABLE:
                # Ends without `end`: the client reconnects with Last-Event-ID (503 until the
                # database is back) and misses nothing.
                log.warning("event stream of job %s ended: database unavailable", job_id)
                yield _sse(comment="database unavailable")
                return
            if check_key:
                key_checked = time.monotonic()
            if revoked:
                # Ends without `end` as well: the client's reconnect gets its 401.
                yield _sse(comment="API key revoked")
                return
            for ev in events:
                last = ev["seq"]
                yield _sse(
                    json.dumps(ev), id=str(ev["seq"]),
                    event="state" if ev["state"] in TERMINAL_STATES else "progress")
            if state is None or (state in TERMINAL_STATES and len(events) < 500):
                yield _sse(json.dumps({"state": state}), event="end")
                return
            await asyncio.sleep(settings.sse_poll_s)

    return EventSourceResponse(
        stream(), ping=settings.sse_heartbeat_s, sep="\n",
        ping_message_factory=lambda: _sse(comment="heartbeat"),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=NOT_FOUND,
            summary="Files the job produced")
def list_artifacts(job_id: str, tenant: TenantDep, session: SessionDep) -> ArtifactList:
    job = tenant_job(session, tenant, job_id)
    rows = session.scalars(select(Artifact).where(Artifact.job_id == job.id)
                           .order_by(Artifact.name))
    return ArtifactList(job_id=job.id, items=[
        ArtifactOut(name=a.name, size=a.size, sha256=a.sha256,
                    download_url=f"/v1/jobs/{job.id}/artifacts/{a.name}") for a in rows
    ])


@router.get("/{job_id}/artifacts/{name:path}",
            responses={**NOT_FOUND, 200: {"content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}},
                "description": "the file; `X-Content-SHA256` is its SHA-256",
                "headers": {"X-Content-SHA256": {"schema": {"type": "string"}}}}},
            response_class=FileResponse, summary="Download one artifact (streamed)")
def download_artifact(job_id: str, name: str, tenant: TenantDep, session: SessionDep,
                      settings: SettingsDep) -> FileResponse:
    job = tenant_job(session, tenant, job_id)
    # No artifact name holds a NUL (and Postgres cannot even compare one).
    artifact = None if "\x00" in name else session.scalars(select(Artifact).where(
        Artifact.job_id == job.id, Artifact.name == name)).first()
    if artifact is None:
        raise HTTPException(404, detail=f"job {job_id} has no artifact {name!r}")
    path = Path(artifact.path).resolve()
    root = Path(settings.artifacts_dir).resolve()  # type: ignore[arg-type]
    if root not in path.parents or not path.is_file():
        log.warning("artifact %s is missing or outside the artifacts dir", name,
                    extra={"job_id": job.id})
        raise HTTPException(404, detail=f"artifact {name!r} is not available on disk")
    return FileResponse(path, filename=Path(name).name,
                        headers={"X-Content-SHA256": artifact.sha256})
