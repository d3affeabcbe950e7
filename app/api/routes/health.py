"""Liveness, readiness (database and broker reachable) and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app.api.probes import Probe
from app.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health,
            summary="The process is up (touches no dependency)")
async def healthz() -> dict[str, str]:
    # async: answered on the event loop, so it needs no thread of the request pool (which
    # requests stuck on a hung dependency may all hold) and never waits on a dependency.
    return {"status": "ok"}


def readiness_probes(state: Any) -> dict[str, Probe]:
    """One bounded probe per dependency (built once per app, see app.api.probes)."""
    timeout = state.settings.health_timeout_s

    def database() -> None:
        with state.session_factory() as s:
            s.execute(text("SELECT 1"))

    probes = {"database": Probe("database", database, timeout)}
    ping = getattr(state.broker, "ping", None)
    if not state.settings.embedded and ping is not None:
        probes["broker"] = Probe("broker", ping, timeout)
    return probes


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "not ready: a check failed "
                             "(database, broker, or no way to run jobs)"}},
            summary="Database, broker and a job runner are available (each check bounded)")
async def readyz(request: Request) -> Any:
    state = request.app.state
    probes = getattr(state, "probes", None)
    if probes is None:
        probes = state.probes = readiness_probes(state)
    results = await asyncio.gather(*(p.run() for p in probes.values()))
    checks = dict(zip(probes, results))
    if "broker" not in checks:
        checks["broker"] = "embedded (in-process worker)" if state.settings.embedded else "ok"
    problem = getattr(state, "cannot_run_jobs", None)
    if problem:
        checks["worker"] = f"unavailable: {problem}"
    elif state.settings.embedded:
        checks["worker"] = "embedded" if state.embedded_worker is not None else \
            "none in this process (SLIMGPT_EMBEDDED_WORKER is empty)"
    ready = all(not c.startswith(("unreachable", "unavailable")) for c in checks.values())
    return JSONResponse(status_code=200 if ready else 503,
                        content={"status": "ready" if ready else "not ready", "checks": checks})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {
                "schema": {"type": "string"}}}, "description": "Prometheus text format"}})
def metrics(
    request: Request,
    scope: Annotated[Literal["process", "fleet"] | None, Query(
        description="`process`: this replica's HTTP metrics; `fleet`: jobs, queue and workers "
        "from the database (the same on every replica); absent: both")] = None,
) -> Response:
    return Response(request.app.state.metrics.exposition(scope), media_type=CONTENT_TYPE_LATEST)
