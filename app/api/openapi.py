"""The OpenAPI document and the interactive docs, served from the package.

FastAPI generates the document from the routes; this module completes what a generated client
must be able to trust: every error status a route can answer, documented once here instead of
on every route (401/429 on authenticated routes, 422 where there is input, 413 where there is a
body, 503 when the database is down, 500), all as RFC 9457 ``application/problem+json`` with
``Retry-After`` where the server sends one; and the list of error codes. Swagger UI and ReDoc
load their assets from this package (fastapi-offline ships them), so /docs works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.api.errors import API_CODES, JOB_ERROR_CODES, PROBLEM_JSON
from app.schemas import Problem

DOCS_STATIC = "/docs-static"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "integer", "minimum": 0}}}
COMMON_ERRORS: dict[str, str] = {
    "400": "the body cannot be parsed (malformed JSON or multipart)",
    "401": "missing, invalid or revoked API key",
    "413": "request body larger than SLIMGPT_MAX_BODY_BYTES (uploads: "
           "SLIMGPT_MAX_UPLOAD_BYTES)",
    "422": "invalid request: `errors` points at each offending field",
    "429": "rate limited (requests, queued jobs or upload bytes per tenant)",
    "500": "an unexpected error of the service (logged with the request id)",
    "503": "the database (or what the request needs) is unavailable",
}


def _codes_table() -> str:
    rows = "\n".join(f"| `{c}` | {d} |" for c, d in API_CODES.items())
    jobs = "\n".join(f"| `{c}` | {d} |" for c, d in JOB_ERROR_CODES.items())
    return (
        "\n\n## Errors\n\nEvery error answer is RFC 9457 problem details "
        "(`application/problem+json`): `type`, `title`, `status`, `detail`, a stable `code`, and "
        "for invalid input `errors`, one per field with a JSON `pointer` into the body (or the "
        "`parameter` / `header`). `Retry-After` comes with 429 and 503.\n\n"
        f"| code | meaning |\n|---|---|\n{rows}\n\n"
        "A failed job carries the worker's code in `error_code`:\n\n"
        f"| code | meaning |\n|---|---|\n{jobs}\n")


def _has_input(op: dict[str, Any]) -> bool:
    return bool(op.get("parameters")) or "requestBody" in op


def complete_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the shared error responses and problem+json content to a FastAPI document."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, sub in Problem.model_json_schema(
            ref_template="#/components/schemas/{model}").pop("$defs", {}).items():
        components[name] = sub
    components["Problem"] = {k: v for k, v in Problem.model_json_schema(
        ref_template="#/components/schemas/{model}").items() if k != "$defs"}
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses: dict[str, Any] = op["responses"]
            wanted = ["500"]
            if path.startswith("/v1/"):
                wanted += ["503"]
            if op.get("security"):
                wanted += ["401", "429"]
            if _has_input(op):
                wanted += ["422"]
            if "requestBody" in op:
                wanted += ["400", "413"]
            for status in wanted:
                responses.setdefault(status, {"description": COMMON_ERRORS[status]})
            for status, response in responses.items():
                if not status.isdigit() or int(status) < 400:
                    continue
                if path == "/readyz" and status == "503":
                    continue  # not ready: the same document as ready
                response["content"] = {PROBLEM_JSON: {"schema": PROBLEM_REF}}
                if status in ("429", "503"):
                    response.setdefault("headers", {}).update(RETRY_AFTER)
                if response.get("description") in (None, "", "Validation Error"):
                    response["description"] = COMMON_ERRORS.get(status, "error")
    _add_links(schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


#: OpenAPI links: where the id a response returns can be used next (for tools that chain
#: calls, e.g. schemathesis's stateful tests, and for readers).
_LINKS = {
    ("/v1/jobs", "post", "202"): ("job_id", "$response.body#/id", [
        ("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}/cancel", "post"),
        ("/v1/jobs/{job_id}/events", "get"), ("/v1/jobs/{job_id}/artifacts", "get")]),
    ("/v1/files", "post", "201"): ("file_id", "$response.body#/id", [
        ("/v1/files/{file_id}", "get")]),
}


def _add_links(schema: dict[str, Any]) -> None:
    paths = schema.get("paths", {})
    for (path, method, status), (param, expr, targets) in _LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        links = response.setdefault("links", {})
        for target, target_method in targets:
            op = paths.get(target, {}).get(target_method)
            if op and op.get("operationId"):
                links[op["operationId"]] = {"operationId": op["operationId"],
                                            "parameters": {param: expr}}


def install(app: FastAPI) -> None:
    """Serve /openapi.json (completed), /docs and /redoc with local assets."""
    import fastapi_offline

    static = Path(fastapi_offline.__file__).parent / "static"

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=(app.description or "") + _codes_table(),
                                 routes=app.routes, tags=app.openapi_tags,
                                 servers=app.servers)
            app.openapi_schema = complete_openapi(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.mount(DOCS_STATIC, StaticFiles(directory=static), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True, "tryItOutEnabled": True})

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_STATIC}/favicon.png", with_google_fonts=False)
