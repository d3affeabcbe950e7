"""Pure-ASGI middleware: request-body size limit and request metrics."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """413 for a body over the limit, checked on Content-Length and while streaming (chunked
    bodies included). Uploads (``upload_prefixes``) get their own, larger limit."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int,
                 upload_prefixes: tuple[str, ...] = ("/v1/files",)) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit
        self.upload_prefixes = upload_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        limit = self.upload_limit if path.startswith(self.upload_prefixes) else self.limit
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, "invalid Content-Length header")
                    return
                if declared > limit:
                    await _send_json(send, 413, BodyTooLarge(limit).detail)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if not started:
                await _send_json(send, 413, exc.detail)


async def _send_json(send: Send, status: int, detail: str) -> None:
    from app.api.errors import PROBLEM_JSON, problem_body

    body = json.dumps(problem_body(status, detail)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM_JSON.encode()),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RouteTemplates:
    """Path -> route template (``/v1/jobs/{job_id}``) for requests that never reached the
    router (a 413 from the body limit) or a mount that the router does not record in the
    scope. Built from the routers the app includes."""

    def __init__(self, routes: Sequence[Any] = (), mounts: Sequence[str] = (),
                 paths: Sequence[str | None] = ()) -> None:
        self.routes = [(r.path_regex, str(r.path)) for r in routes
                       if getattr(r, "path_regex", None) is not None and getattr(r, "path", None)]
        self.routes += [(re.compile(f"^{re.escape(p)}$"), p) for p in paths if p]
        self.mounts = [m.rstrip("/") for m in mounts]

    def lookup(self, path: str) -> str | None:
        for mount in self.mounts:
            if path.startswith(mount + "/"):
                return f"{mount}/{{path}}"
        return next((template for regex, template in self.routes if regex.match(path)), None)


def route_template(scope: Scope, templates: RouteTemplates | None = None) -> str:
    """The matched route's path template, never the raw path, so label values stay few;
    ``unmatched`` only for paths no route serves."""
    route = scope.get("route")
    if isinstance(route, Mount):  # static files: one series for the whole folder
        return f"{route.path.rstrip('/')}/{{path}}"
    path = getattr(route, "path", None)
    if path:
        return str(path)
    found = templates.lookup(scope.get("path", "")) if templates is not None else None
    return found or "unmatched"


class MetricsMiddleware:
    """Counts every request by route template; observes latency except for event streams,
    which are tracked as open streams instead."""

    def __init__(self, app: ASGIApp, metrics: Any, templates: RouteTemplates | None = None
                 ) -> None:
        self.app = app
        self.metrics = metrics
        self.templates = templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state: dict[str, Any] = {"code": 500, "stream": None}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["code"] = message["status"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if content_type.startswith(b"text/event-stream"):
                    state["stream"] = route_template(scope, self.templates)
                    self.metrics.streams.labels(state["stream"]).inc()
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            if state["stream"] is not None:
                self.metrics.streams.labels(state["stream"]).dec()
            self.metrics.observe_request(scope.get("method", "GET"),
                                         route_template(scope, self.templates),
                                         state["code"], time.perf_counter() - start,
                                         stream=state["stream"] is not None)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
access_log = logging.getLogger("slimgpt.access")


class RequestContextMiddleware:
    """Gives every request an id (the caller's ``X-Request-ID`` when it is sane, else a new one),
    returns it as ``X-Request-ID``, puts it on every log line logged while the request is
    handled, and logs one access line per request (method, path, status, duration)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from app.core.logging import request_context

        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        status = {"code": 500}
        start = time.perf_counter()

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        with request_context(request_id):
            try:
                await self.app(scope, receive, with_id)
            finally:
                access_log.info("%s %s %d", scope.get("method", ""), scope.get("path", ""),
                                status["code"], extra={
                                    "method": scope.get("method"), "path": scope.get("path"),
                                    "status": status["code"],
                                    "duration_ms": round((time.perf_counter() - start) * 1e3,
                                                         1)})
