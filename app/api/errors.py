"""One error shape everywhere: RFC 9457 problem details (``application/problem+json``) with a
stable machine-readable ``code`` and, for invalid input, a pointer to each offending field.

Every bad input is a 4xx with a message; only real faults are a 500 (and logged). Routes raise
:class:`ApiProblem` (or a plain ``HTTPException``, whose status picks the code)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("slimgpt.api")

PROBLEM_JSON = "application/problem+json"
#: The ``code`` of an error answer with no more specific one, by HTTP status.
CODE_FOR_STATUS: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}
#: Codes an API answer can carry, with what they mean (documented in the OpenAPI).
API_CODES: dict[str, str] = {
    **{code: HTTPStatus(status).phrase for status, code in CODE_FOR_STATUS.items()},
    "malformed_json": "the request body is not valid JSON",
    "idempotency_conflict": "the Idempotency-Key was used with another request body",
    "job_finished": "the job already ended; it cannot be cancelled",
    "database_unavailable": "the job database did not answer in time; retry after Retry-After",
    "cannot_run_jobs": "this server has no way to run jobs (e.g. no `worker` extra)",
    "no_worker_pool": "no worker pool can run the job (`resources`); `estimates` say why",
}
#: Codes a failed job carries (``JobOut.error_code``): the worker's (worker/errors.py).
JOB_ERROR_CODES: dict[str, str] = {
    "model_gated": "the model is gated: add a Hub token and accept its license",
    "hub_unauthorized": "the Hub rejected the tenant's token",
    "model_not_found": "no such model (or dataset) repository on the Hub",
    "revision_not_found": "no such revision of the model",
    "unsupported_model": "the model's architecture is not supported",
    "invalid_model_source": "a malformed or missing model reference",
    "invalid_calibration_source": "the calibration data cannot be used",
    "invalid_eval_source": "the evaluation data cannot be used",
    "hub_unavailable": "the Hub kept failing (rate limits, 5xx, network)",
    "hub_offline": "HF_HUB_OFFLINE is set and the data is not in the local cache",
    "publish_failed": "publishing the result failed",
    "heal_unavailable": "healing was asked for and this job's placement cannot do it",
    "zero_shot_unavailable": "zero-shot tasks were asked for and the worker cannot run them",
    "setting_unavailable": "the pruning preset needs what this model's family, placement or "
    "GPU count does not give (the message says which)",
    "cholesky_failed": "a Hessian stayed not positive definite after more damping",
    "non_finite_hessian": "a layer's inputs had NaN/inf values",
    "gpu_out_of_memory": "the GPU ran out of memory",
    "gpu_rank_failed": "a GPU process of a multi-GPU job died (retried from the checkpoints)",
    "out_of_memory": "the worker ran out of host memory",
    "disk_full": "the worker ran out of disk space",
    "time_limit": "the job exceeded its time limit",
    "worker_lost": "the job's workers were lost too many times",
    "internal_error": "an unexpected error (see the worker's log)",
}

#: What a client should wait before retrying when a dependency is down (seconds).
RETRY_AFTER_S = 5
#: The database did not answer, or not in time: a connection refused or lost, a connect, lock
#: or statement timeout (OperationalError), a broken connection (InterfaceError), no pooled
#: connection free within the pool timeout (TimeoutError).
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)


class ApiProblem(HTTPException):
    """An HTTP error with its own ``code`` (and optional per-field ``errors``)."""

    def __init__(self, status: int, detail: str, *, code: str | None = None,
                 errors: list[dict[str, Any]] | None = None,
                 headers: Mapping[str, str] | None = None,
                 extensions: Mapping[str, Any] | None = None) -> None:
        super().__init__(status, detail=detail, headers=dict(headers) if headers else None)
        self.code = code or CODE_FOR_STATUS.get(status, "error")
        self.errors = errors
        #: RFC 9457 extension members: more about this problem, beside the standard ones.
        self.extensions = dict(extensions or {})


def problem_body(status: int, detail: str, *, code: str | None = None,
                 errors: list[dict[str, Any]] | None = None,
                 instance: str | None = None,
                 extensions: Mapping[str, Any] | None = None) -> dict[str, Any]:
    code = code or CODE_FOR_STATUS.get(status, "error")
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": f"urn:slimgpt:error:{code}", "title": title,
                            "status": status, "detail": detail, "code": code}
    if errors:
        body["errors"] = errors
    for key, value in (extensions or {}).items():
        body.setdefault(key, value)
    return body


def problem(status: int, detail: str, *, code: str | None = None,
            errors: list[dict[str, Any]] | None = None, instance: str | None = None,
            headers: Mapping[str, str] | None = None,
            extensions: Mapping[str, Any] | None = None) -> JSONResponse:
    return JSONResponse(problem_body(status, detail, code=code, errors=errors,
                                     instance=instance, extensions=extensions),
                        status_code=status, media_type=PROBLEM_JSON,
                        headers=dict(headers) if headers else None)


# -- validation -------------------------------------------------------------------------------
def _pointer(loc: Any) -> dict[str, str]:
    """Where an invalid input is: a JSON pointer into the body (``#/calibration/source``), or
    the query parameter / header / path parameter by name."""
    parts = [str(p) for p in loc]
    where = parts[0] if parts else "body"
    rest = parts[1:]
    if where == "body":
        return {"pointer": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1")
                                           for p in rest) if rest else "#"}
    if where == "query":
        return {"parameter": rest[0] if rest else ""}
    if where == "header":
        return {"header": rest[0] if rest else ""}
    if where == "path":
        return {"parameter": rest[0] if rest else ""}
    return {"pointer": "#/" + "/".join(parts)}


def _message(e: Mapping[str, Any]) -> str:
    kind = e.get("type")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "field required"
    return str(e.get("msg", "invalid"))


def _where(ptr: Mapping[str, str]) -> str:
    if "pointer" in ptr:
        return ptr["pointer"].removeprefix("#/").replace("/", ".") or "body"
    return ptr.get("parameter") or ptr.get("header") or "request"


#: A check across fields (a model validator, reported at the body's root) that names the field
#: it blames first: "pruning.preset 'quality': ...".
_NAMED_FIELD = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\b")


def _field_error(e: Mapping[str, Any]) -> dict[str, str]:
    loc, detail = tuple(e.get("loc", ())), _message(e)
    if e.get("type") == "value_error" and loc in ((), ("body",)):
        # pydantic prefixes a validator's own message; the pointer goes to the field it names,
        # so a form can show the message beside that field.
        detail = detail.removeprefix("Value error, ")
        m = _NAMED_FIELD.match(detail)
        if m:
            loc = ("body", *m.group(1).split("."))
    return {**_pointer(loc), "detail": detail, "type": str(e.get("type"))}


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    raw = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in raw):
        ctx = next((e.get("ctx") or {} for e in raw if e.get("type") == "json_invalid"), {})
        reason = ctx.get("error", "invalid JSON")
        return problem(400, f"malformed JSON body: {reason}", code="malformed_json",
                       instance=request.url.path)
    # Never echo the input back: it may contain a token.
    errors = [_field_error(e) for e in raw]
    return problem(422, "; ".join(f"{_where(e)}: {e['detail']}" for e in errors),
                   code="invalid_request", errors=errors, instance=request.url.path)


_FIELD_DETAIL = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.DOTALL)


def allowed_methods(request: Request) -> list[str]:
    """Every documented method of this path (Starlette's 405 names only the first matching
    route's, and GET and POST of one path are two routes)."""
    paths = request.app.openapi().get("paths", {})
    path = request.url.path
    for template, item in paths.items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return sorted(m.upper() for m in item if m in _HTTP_METHODS)
    return []


_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


async def http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        methods = allowed_methods(request)
        if methods:
            headers["Allow"] = ", ".join(methods)
    code = getattr(exc, "code", None)
    errors = getattr(exc, "errors", None)
    if errors is None and exc.status_code == 422:
        # "calibration.source: no uploaded file ...": the same field pointer as a schema error.
        m = _FIELD_DETAIL.match(detail)
        if m:
            errors = [{"pointer": "#/" + m.group(1).replace(".", "/"), "detail": m.group(2),
                       "type": "value_error"}]
    return problem(exc.status_code, detail, code=code, errors=errors,
                   instance=request.url.path, headers=headers or None,
                   extensions=getattr(exc, "extensions", None))


def database_unavailable(request: Request) -> JSONResponse:
    return problem(503, "the database is unavailable; try again later",
                   code="database_unavailable", instance=request.url.path,
                   headers={"Retry-After": str(RETRY_AFTER_S)})


async def database_handler(request: Request, exc: Exception) -> JSONResponse:
    # Not an error of this process: one line, no traceback (an outage logs it per request).
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                type(getattr(exc, "orig", None) or exc).__name__)
    return database_unavailable(request)


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "internal server error", code="internal_error",
                   instance=request.url.path)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_handler)  # type: ignore[arg-type]
    for exc_class in DATABASE_UNAVAILABLE:
        app.add_exception_handler(exc_class, database_handler)
    app.add_exception_handler(Exception, unhandled_handler)
