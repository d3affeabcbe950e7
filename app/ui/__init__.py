"""The dashboard: server-rendered pages under /ui with a little JavaScript, no build step and
no third-party assets (everything it needs is in app/ui/static)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api import errors
from app.ui.auth import LoginRequired
from app.ui.render import STATIC_DIR, render
from app.ui.routes import router

#: Where the package's static files are served.
STATIC_PATH = "/ui/static"
__all__ = ["STATIC_PATH", "install", "router"]


async def _login_required(request: Request, exc: LoginRequired) -> Response:
    return RedirectResponse(f"/ui/login?next={quote(exc.next_path, safe='/')}", status_code=303)


def _wants_html(request: Request) -> bool:
    return (request.url.path.startswith("/ui/") and request.method == "GET"
            and "text/html" in request.headers.get("accept", ""))


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Dashboard pages get an HTML error page; everything else the API's JSON."""
    if not _wants_html(request):
        return await errors.http_handler(request, exc)
    return render(request, "error.html", {"status": exc.status_code, "detail": exc.detail},
                  status=exc.status_code)


def install(app: FastAPI) -> None:
    """Add the dashboard to the API app (after :func:`app.api.errors.install`)."""
    app.include_router(router)
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.add_exception_handler(LoginRequired, _login_required)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
