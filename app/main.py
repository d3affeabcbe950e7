"""The FastAPI application factory."""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import sessionmaker

from app import __version__, ui
from app.api import errors, openapi
from app.api.middleware import (
    BodyLimitMiddleware,
    MetricsMiddleware,
    RequestContextMiddleware,
    RouteTemplates,
)
from app.api.routes import estimate, events, files, health, hub_token, jobs
from app.core.config import Settings, get_settings
from app.core.logging import configure_logging
from app.db.session import get_engine
from app.dispatch import CeleryPublisher
from app.dispatcher import Dispatcher
from app.metrics import Metrics

log = logging.getLogger("slimgpt.api")

#: Room for multipart framing around an upload of max_upload_bytes.
MULTIPART_OVERHEAD = 64 * 1024
#: At shutdown, how long the embedded worker may take to hand its job back (next layer).
EMBEDDED_STOP_S = 10.0


def load_object(spec: str) -> Any:
    """``"module:attr"`` imported; used for pieces chosen by settings."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:attr', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


def create_app(
    settings: Settings | None = None,
    *,
    dispatcher: Dispatcher | None = None,
    embedded_worker: Any | None = None,
    runner: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the API.

    Background pieces, started and stopped with the app: the dispatcher
    (``SLIMGPT_DISPATCHER_ENABLED``; it publishes committed jobs and sweeps lost ones) and, in
    embedded mode, the in-process worker named by ``SLIMGPT_EMBEDDED_WORKER`` (it takes queued
    jobs from the database). ``dispatcher`` and ``embedded_worker`` replace the ones the
    settings choose (tests); ``runner`` replaces ``worker.runner.run_job`` in the embedded
    worker. The app itself never imports the ``worker`` package.
    """
    settings = settings or get_settings()
    settings.validate_for_serving()
    engine = get_engine(settings, requests=True)  # bounded waits: a dead database is a 503
    session_factory = sessionmaker(bind=engine, expire_on_commit=False)
    if dispatcher is None and settings.dispatcher_enabled:
        dispatcher = Dispatcher(settings, session_factory)
    cannot_run_jobs: str | None = None
    if embedded_worker is None and settings.embedded and settings.embedded_worker:
        try:
            embedded_worker = load_object(settings.embedded_worker)(settings, runner=runner)
        except ImportError as err:
            cannot_run_jobs = (f"this server cannot run jobs: its embedded worker "
                               f"{settings.embedded_worker} cannot be imported ({err}); install "
                               "the `worker` extra: pip install 'slimgpt-service[worker]'")
    if embedded_worker is not None:
        reason = getattr(embedded_worker, "unavailable_reason", None)
        cannot_run_jobs = reason() if callable(reason) else None
        if cannot_run_jobs is not None:
            log.error("%s", cannot_run_jobs)
            embedded_worker = None  # it would only fail every job it took
    broker = None
    if not settings.embedded:
        broker = dispatcher.publisher if dispatcher is not None else CeleryPublisher(settings)
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
        if dispatcher is not None:
            dispatcher.start()
        if embedded_worker is not None:
            embedded_worker.start()
        log.info("SlimGPT API ready (%s mode)", "embedded" if settings.embedded else "production")
        yield
        if embedded_worker is not None:
            await run_in_threadpool(embedded_worker.stop, EMBEDDED_STOP_S)
        if dispatcher is not None:
            await run_in_threadpool(dispatcher.stop)

    app = FastAPI(
        title="SlimGPT pruning service",
        version=__version__,
        description="Submit a model and a target ratio; a GPU worker prunes it with SlimGPT "
        "(structured OBS pruning of heads and FFN channels) and publishes the smaller model. "
        "Authenticate with `Authorization: Bearer <API key>` (or `X-API-Key: <API key>`); "
        "in /docs, press **Authorize** and paste the key.",
        lifespan=lifespan,
        # operationId = the route function's name (`create_job`, `get_job`, ...): what a
        # generated client names its functions.
        generate_unique_id_function=lambda route: route.name,
        docs_url=None,  # served by app.api.openapi with the package's own assets
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.dispatcher = dispatcher
    app.state.embedded_worker = embedded_worker
    #: Why submissions are refused (503) and /readyz is not ready; None when jobs can run.
    app.state.cannot_run_jobs = cannot_run_jobs
    app.state.broker = broker
    app.state.metrics = metrics
    errors.install(app)
    openapi.install(app)
    routers = (jobs.router, files.router, hub_token.router, estimate.router, health.router,
               events.router, ui.router)
    for router in routers[:-1]:
        app.include_router(router)
    ui.install(app)
    templates = RouteTemplates(
        [r for router in routers for r in router.routes], mounts=[ui.STATIC_PATH],
        paths=[app.openapi_url, "/docs", "/redoc"])
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes,  # type: ignore[arg-type]
                       upload_limit=settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(MetricsMiddleware, metrics=metrics,  # type: ignore[arg-type]
                       templates=templates)
    app.add_middleware(RequestContextMiddleware)  # outermost: its id is on every line
    return app


def app_from_env() -> Any:
    """uvicorn factory: ``uvicorn --factory app.main:app_from_env``."""
    settings = get_settings()
    configure_logging(settings.log_json, settings.log_level)
    return create_app(settings)
