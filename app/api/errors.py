"""Every bad input is a 4xx with a message; only real faults are a 500 (and logged)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("slimgpt.api")


def _loc(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) if parts else "body"


def _clean_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Never echo the input back: it may contain a token.
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors]


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next((e.get("ctx") or {} for e in errors if e.get("type") == "json_invalid"), {})
        reason = ctx.get("error", "invalid JSON")
        return JSONResponse(status_code=400,
                            content={"detail": f"malformed JSON body: {reason}"})
    messages = []
    for e in errors:
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif e.get("type") == "missing":
            msg = "field required"
        messages.append(f"{_loc(e.get('loc', ()))}: {msg}")
    return JSONResponse(
        status_code=422,
        content={"detail": "; ".join(messages), "errors": _clean_errors(errors)},
    )


async def http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail},
                        headers=getattr(exc, "headers", None))


#: What a client should wait before retrying when a dependency is down (seconds).
RETRY_AFTER_S = 5
#: The database did not answer, or not in time: a connection refused or lost, a connect, lock
#: or statement timeout (OperationalError), a broken connection (InterfaceError), no pooled
#: connection free within the pool timeout (TimeoutError).
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)


def database_unavailable(request: Request) -> JSONResponse:
    return JSONResponse(status_code=503,
                        content={"detail": "the database is unavailable; try again later"},
                        headers={"Retry-After": str(RETRY_AFTER_S)})


async def database_handler(request: Request, exc: Exception) -> JSONResponse:
    # Not an error of this process: one line, no traceback (an outage logs it per request).
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                type(getattr(exc, "orig", None) or exc).__name__)
    return database_unavailable(request)


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"detail": "internal server error"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_handler)  # type: ignore[arg-type]
    for exc_class in DATABASE_UNAVAILABLE:
        app.add_exception_handler(exc_class, database_handler)
    app.add_exception_handler(Exception, unhandled_handler)
