"""Dashboard pages under /ui: sign-in, jobs, one job, submit, queue & fleet, and the live
stream. Pages are rendered on the server; a little JavaScript (app/ui/static) keeps them live.

Job operations go through the same functions as the /v1 API (``app.api.routes.jobs``), so the
dashboard validates, submits, cancels and downloads exactly like the API does.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.api import errors
from app.api.deps import LOCAL_TENANT
from app.api.routes import jobs as api_jobs
from app.crud.tenants import authenticate, get_or_create_tenant
from app.db.models import Tenant
from app.schemas import UUID_RE, JobCreate
from app.streams import job_snapshot, latest_event_id, sse
from app.ui import session as ui_session
from app.ui.auth import (
    LoginRequired,
    Viewer,
    clear_session_cookie,
    require_csrf,
    safe_next,
    same_origin,
    set_session_cookie,
    signing_key,
    viewer_from_cookie,
)
from app.ui.render import render
from app.ui.views import (
    fleet_view,
    form_values,
    job_counts,
    job_view,
    list_jobs,
    parse_filters,
)

router = APIRouter(include_in_schema=False)

NOTICES = {
    "cancel_requested": "Cancel requested: the job stops at its next layer boundary.",
    "cancelled": "The job was cancelled.",
}


def _db(request: Request) -> Session:
    return request.app.state.session_factory()  # type: ignore[no-any-return]


def _page_viewer(request: Request, db: Session) -> Viewer:
    viewer = viewer_from_cookie(request, db)
    if viewer is None:
        raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query
                                                else ""))
    return viewer


def _tenant(db: Session, viewer: Viewer) -> Tenant:
    tenant = db.get(Tenant, viewer.tenant_id)
    if tenant is None:
        raise HTTPException(401, detail="the tenant of this session no longer exists")
    db.expunge(tenant)
    db.rollback()
    return tenant


# -- entry points ------------------------------------------------------------------------------
@router.get("/")
@router.get("/dashboard")
@router.get("/ui")
@router.get("/ui/")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


# -- sign-in -----------------------------------------------------------------------------------
@router.get("/ui/login")
def login_page(request: Request, next: str | None = None) -> Response:
    settings = request.app.state.settings
    with _db(request) as db:
        if settings.auth_disabled:  # embedded, no keys: everyone is tenant `local`
            tenant = get_or_create_tenant(db, LOCAL_TENANT)
            value, _ = ui_session.issue(signing_key(request), key_id=None, tenant_id=tenant.id,
                                        ttl_s=settings.ui_session_ttl_s)
            response = RedirectResponse(safe_next(next), status_code=303)
            set_session_cookie(request, response, value)
            return response
        if viewer_from_cookie(request, db) is not None:
            return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/ui/login")
def login(request: Request, api_key: Annotated[str, Form(max_length=512)] = "",
          next: Annotated[str, Form(max_length=2048)] = "") -> Response:
    if not same_origin(request):
        raise HTTPException(403, detail="cross-site request refused")
    settings = request.app.state.settings
    with _db(request) as db:
        tenant = authenticate(db, api_key.strip()) if api_key.strip() else None
        if tenant is None:
            db.rollback()
            return render(request, "login.html", {
                "next": safe_next(next),
                "error": "That API key is not valid, or it was revoked."}, status=401)
        from app.core.security import parse_api_key

        value, _ = ui_session.issue(signing_key(request), key_id=parse_api_key(api_key.strip()),
                                    tenant_id=tenant.id, ttl_s=settings.ui_session_ttl_s)
        db.rollback()
    response = RedirectResponse(safe_next(next), status_code=303)
    set_session_cookie(request, response, value)
    return response


@router.post("/ui/logout")
def logout(request: Request, csrf_token: Annotated[str, Form(max_length=256)] = "") -> Response:
    with _db(request) as db:
        viewer = viewer_from_cookie(request, db)
    if viewer is not None:
        require_csrf(request, viewer, csrf_token)
    response = RedirectResponse("/ui/login", status_code=303)
    clear_session_cookie(response)
    return response


# -- jobs --------------------------------------------------------------------------------------
@router.get("/ui/jobs")
def jobs_page(request: Request) -> Response:
    filters = parse_filters(request.query_params)
    with _db(request) as db:
        viewer = _page_viewer(request, db)
        after = latest_event_id(db)  # read first: the stream then misses nothing rendered
        page = list_jobs(db, viewer.tenant_id, filters)
    return render(request, "jobs.html", {
        "viewer": viewer, "filters": filters, "page": page, "stream_after": after,
        "nav": "jobs"})


@router.get("/ui/counts")
def counts(request: Request) -> JSONResponse:
    """The viewer's jobs by state (the jobs page refreshes its counters with it)."""
    with _db(request) as db:
        viewer = viewer_from_cookie(request, db)
        if viewer is None:
            raise HTTPException(401, detail="sign in first")
        result = job_counts(db, viewer.tenant_id)
    return JSONResponse(result, headers={"Cache-Control": "no-store"})


def _job_or_404(db: Session, viewer: Viewer, job_id: str) -> Any:
    return api_jobs.tenant_job(db, _tenant(db, viewer), job_id)


@router.get("/ui/jobs/{job_id}")
def job_page(request: Request, job_id: str, notice: str | None = None,
             error: str | None = None) -> Response:
    with _db(request) as db:
        viewer = _page_viewer(request, db)
        after = latest_event_id(db)
        job = _job_or_404(db, viewer, job_id)
        view = job_view(db, job, after)
    return render(request, "job.html", {
        "viewer": viewer, "v": view, "job": view.job, "nav": "jobs",
        "notice": NOTICES.get(notice or ""), "error": error if error else None,
        "snapshot": job_snapshot(view.job)})


@router.post("/ui/jobs/{job_id}/cancel")
def cancel(request: Request, job_id: str,
           csrf_token: Annotated[str, Form(max_length=256)] = "") -> Response:
    with _db(request) as db:
        viewer = _page_viewer(request, db)
        require_csrf(request, viewer, csrf_token)
        tenant = _tenant(db, viewer)
        try:
            job = api_jobs.cancel_job(job_id, tenant, db)
        except HTTPException as exc:
            if exc.status_code != 409:
                raise
            return RedirectResponse(f"/ui/jobs/{job_id}?error=" + _q(str(exc.detail)),
                                    status_code=303)
    notice = "cancelled" if job.state == "cancelled" else "cancel_requested"
    return RedirectResponse(f"/ui/jobs/{job_id}?notice={notice}", status_code=303)


def _q(text: str) -> str:
    from urllib.parse import quote

    return quote(text[:300], safe="")


@router.get("/ui/jobs/{job_id}/artifacts/{name:path}")
def download(request: Request, job_id: str, name: str) -> Response:
    with _db(request) as db:
        viewer = _page_viewer(request, db)
        tenant = _tenant(db, viewer)
        return api_jobs.download_artifact(job_id, name, tenant, db, request.app.state.settings)


# -- submit ------------------------------------------------------------------------------------
@router.get("/ui/submit")
def submit_page(request: Request, from_job: Annotated[str | None, Query(alias="from")] = None
                ) -> Response:
    with _db(request) as db:
        viewer = _page_viewer(request, db)
        base: dict[str, Any] = {}
        source = None
        if from_job:
            source = _job_or_404(db, viewer, from_job)
            base = dict(source.request or {})
    defaults = JobCreate(model_id="x", target_ratio=0.2).model_dump(mode="json")
    defaults["model_id"] = defaults["target_ratio"] = None
    values, advanced = form_values(defaults, base)
    return render(request, "submit.html", {
        "viewer": viewer, "nav": "submit", "source": source, "values": values,
        "advanced": advanced, "idempotency_key": uuid.uuid4().hex})


@router.post("/ui/jobs")
async def submit(request: Request) -> Response:
    """The submit form's JSON body, validated and accepted exactly like POST /v1/jobs."""
    db = _db(request)
    try:
        viewer = await run_in_threadpool(viewer_from_cookie, request, db)
        if viewer is None:
            raise HTTPException(401, detail="your session ended: sign in again")
        require_csrf(request, viewer)
        try:
            raw = await request.json()
        except ValueError:
            from app.api.errors import problem

            return problem(400, "malformed JSON body", code="malformed_json")
        idempotency_key = request.headers.get("idempotency-key") or None
        try:
            body = JobCreate.model_validate(raw)
        except ValidationError as exc:
            return await errors.validation_handler(
                request, RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                                 for e in exc.errors()]))
        request.state.api_key_id = viewer.key_id  # "submitted by"

        def create() -> Any:
            tenant = _tenant(db, viewer)
            return api_jobs.create_job(body=body, request=request, response=Response(),
                                       tenant=tenant, session=db,
                                       settings=request.app.state.settings,
                                       idempotency_key=idempotency_key)

        try:
            out = await run_in_threadpool(create)
        except HTTPException as exc:  # the API's own error answer (problem+json)
            from app.api.errors import http_handler

            return await http_handler(request, exc)
        data = out.model_dump(mode="json") if hasattr(out, "model_dump") else json.loads(out.body)
        return JSONResponse({"id": data["id"], "url": f"/ui/jobs/{data['id']}"},
                            status_code=202)
    finally:
        db.close()


# -- queue & fleet -----------------------------------------------------------------------------
@router.get("/ui/fleet")
def fleet_page(request: Request, partial: bool = False) -> Response:
    with _db(request) as db:
        viewer = _page_viewer(request, db)
        view = fleet_view(db, viewer.tenant_id, request.app.state.settings.worker_heartbeat_s)
    return render(request, "_fleet_body.html" if partial else "fleet.html",
                  {"viewer": viewer, "f": view, "nav": "fleet",
                   "heartbeat_s": request.app.state.settings.worker_heartbeat_s})


# -- the live stream ---------------------------------------------------------------------------
@router.get("/ui/stream")
async def stream(request: Request,
                 after: Annotated[int | None, Query(ge=0)] = None,
                 job_id: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    """All of the viewer's jobs' events (or one job's) as Server-Sent Events; EventSource
    sends the session cookie, so no key is needed in the URL."""
    db = _db(request)
    try:
        viewer = await run_in_threadpool(viewer_from_cookie, request, db)
        if viewer is None:
            raise HTTPException(401, detail="sign in first")
        if job_id is not None:
            if not UUID_RE.match(job_id):
                raise HTTPException(404, detail=f"job {job_id} not found")
            await run_in_threadpool(_job_or_404, db, viewer, job_id)
        header = request.headers.get("last-event-id", "").strip()
        start = int(header) if header.isdigit() else after
        if start is None:
            start = await run_in_threadpool(latest_event_id, db)
    finally:
        db.close()
    settings = request.app.state.settings

    def still_allowed() -> bool:
        with _db(request) as check:
            return viewer_from_cookie(request, check) is not None

    return StreamingResponse(
        sse(session_factory=request.app.state.session_factory, tenant_id=viewer.tenant_id,
            after=start, poll_s=settings.sse_poll_s, heartbeat_s=settings.sse_heartbeat_s,
            is_disconnected=request.is_disconnected, still_allowed=still_allowed,
            job_id=job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

