"""Liveness, readiness (database and broker reachable) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Database and broker are reachable")
async def readyz(request: Request) -> Any:
    state = request.app.state
    checks: dict[str, str] = {}

    def db() -> None:
        with state.session_factory() as s:
            s.execute(text("SELECT 1"))

    try:
        await run_in_threadpool(db)
        checks["database"] = "ok"
    except Exception as err:  # noqa: BLE001
        checks["database"] = f"unreachable: {type(err).__name__}"
    ping = getattr(state.broker, "ping", None)
    if state.settings.embedded:
        checks["broker"] = "embedded (in-process worker)"
    elif ping is None:
        checks["broker"] = "ok"
    else:
        try:
            checks["broker"] = "ok" if await run_in_threadpool(ping) else "unreachable"
        except Exception as err:  # noqa: BLE001
            checks["broker"] = f"unreachable: {type(err).__name__}"
    ready = checks["database"] == "ok" and not checks["broker"].startswith("unreachable")
    return JSONResponse(status_code=200 if ready else 503,
                        content={"status": "ready" if ready else "not ready", "checks": checks})


@router.get("/metrics", summary="Prometheus metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)
