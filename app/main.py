"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app import __version__, ui
from app.api import errors
from app.api.middleware import BodyLimitMiddleware, MetricsMiddleware, RouteTemplates
from app.api.routes import estimate, events, files, health, hub_token, jobs
from app.core.config import Settings, get_settings
from app.core.logging import configure_logging
from app.db.models import Job
from app.db.session import get_engine
from app.dispatch import Dispatcher, InProcessDispatcher, make_dispatcher
from app.metrics import Metrics

log = logging.getLogger("slimgpt.api")

#: Room for multipart framing around an upload of max_upload_bytes.
MULTIPART_OVERHEAD = 64 * 1024


def _recover_embedded_jobs(session_factory: sessionmaker[Session], dispatcher: Dispatcher) -> None:
    """After a restart the in-process queue is empty: hand it the jobs that never finished."""
    from app.db.base import utcnow

    with session_factory() as s:
        ids = list(s.scalars(select(Job.id).where(
            (Job.state == "queued")
            | ((Job.state == "running") & (Job.lease_expires_at < utcnow()))
        ).order_by(Job.created_at)))
    for job_id in ids:
        log.info("re-enqueueing unfinished job after restart", extra={"job_id": job_id})
        dispatcher.enqueue(job_id)


def create_app(
    settings: Settings | None = None,
    *,
    dispatcher: Dispatcher | None = None,
    runner: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the API. ``dispatcher`` overrides the one chosen by the settings (tests);
    ``runner`` replaces ``worker.runner.run_job`` for the embedded in-process worker."""
    settings = settings or get_settings()
    settings.validate_for_serving()
    engine = get_engine(settings)
    session_factory = sessionmaker(bind=engine, expire_on_commit=False)
    own_dispatcher = dispatcher is None
    if dispatcher is None:
        dispatcher = make_dispatcher(settings, runner, session_factory)
    metrics = Metrics()
    metrics.watch_fleet(session_factory, settings.worker_heartbeat_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for d in (settings.data_dir, settings.artifacts_dir, settings.uploads_dir):
            Path(d).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        if settings.auto_migrate:
            from app.db.migrate import upgrade

            upgrade(str(settings.database_url))
        settings.fernet_key()  # fail early in production; generate the embedded key now
        if own_dispatcher and isinstance(dispatcher, InProcessDispatcher):
            dispatcher.start()
            _recover_embedded_jobs(session_factory, dispatcher)
        log.info("SlimGPT API ready (%s mode)", "embedded" if settings.embedded else "production")
        yield
        if own_dispatcher and isinstance(dispatcher, InProcessDispatcher):
            dispatcher.stop(timeout=1.0)

    app = FastAPI(
        title="SlimGPT pruning service",
        version=__version__,
        description="Submit a model and a target ratio; a GPU worker prunes it with SlimGPT "
        "(structured OBS pruning of heads and FFN channels) and publishes the smaller model. "
        "Authenticate with `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.dispatcher = dispatcher
    app.state.metrics = metrics
    errors.install(app)
    routers = (jobs.router, files.router, hub_token.router, estimate.router, health.router,
               events.router, ui.router)
    for router in routers[:-1]:
        app.include_router(router)
    ui.install(app)
    templates = RouteTemplates(
        [r for router in routers for r in router.routes], mounts=[ui.STATIC_PATH],
        paths=[app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url])
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes,  # type: ignore[arg-type]
                       upload_limit=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(MetricsMiddleware, metrics=metrics,  # type: ignore[arg-type]
                       templates=templates)
    return app


def app_from_env() -> Any:
    """uvicorn factory: ``uvicorn --factory app.main:app_from_env``."""
    settings = get_settings()
    configure_logging(settings.log_json, settings.log_level)
    return create_app(settings)
