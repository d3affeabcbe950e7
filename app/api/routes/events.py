"""GET /v1/events: one Server-Sent Event stream for every job of the caller's tenant."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from app.api.deps import SessionDep, TenantDep
from app.db.models import ApiKey
from app.streams import latest_event_id, sse

router = APIRouter(prefix="/v1", tags=["jobs"])


@router.get(
    "/events",
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "`event: job` messages: the event row plus a `job` "
                     "snapshot (state, phase, percent, ETA, ...)"}},
    summary="Live events of all your jobs (Server-Sent Events), resumable with Last-Event-ID",
)
def tenant_events(
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    after: Annotated[int | None, Query(ge=0, description="start after this event id; absent: "
                                       "only events from now on")] = None,
) -> Any:
    header = request.headers.get("last-event-id", "").strip()
    if header and not header.isdigit():
        raise HTTPException(422, detail="Last-Event-ID must be an event id")
    start = int(header) if header else after
    if start is None:
        start = latest_event_id(session)
    session.rollback()
    settings = request.app.state.settings
    key_id = getattr(request.state, "api_key_id", None)
    factory = request.app.state.session_factory

    def still_allowed() -> bool:  # a revoked key ends its open streams too
        with factory() as s:
            row = s.get(ApiKey, key_id)
            return row is not None and row.revoked_at is None

    return StreamingResponse(
        sse(session_factory=request.app.state.session_factory, tenant_id=tenant.id, after=start,
            poll_s=settings.sse_poll_s, heartbeat_s=settings.sse_heartbeat_s,
            is_disconnected=request.is_disconnected,
            still_allowed=still_allowed if key_id else None),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
