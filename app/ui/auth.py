"""Who is looking at the dashboard: the session cookie, checked against the API key's row on
every request, and the CSRF rules for requests that change something."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, Response
from sqlalchemy.orm import Session

from app.api.deps import LOCAL_TENANT
from app.core.config import Settings
from app.crud.tenants import get_or_create_tenant
from app.db.models import ApiKey, Tenant
from app.ui import session as ui_session

CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"


class LoginRequired(Exception):
    """A page was asked for without a valid session: answered with a redirect to sign-in."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass(frozen=True)
class Viewer:
    tenant_id: str
    tenant_name: str
    key_id: str | None
    key_name: str | None
    session: ui_session.UiSession
    csrf: str


def signing_key(request: Request) -> bytes:
    state = request.app.state
    key = getattr(state, "ui_signing_key", None)
    if key is None:
        key = state.ui_signing_key = ui_session.signing_key(state.settings)
    return key


def viewer_from_cookie(request: Request, db: Session) -> Viewer | None:
    """The signed-in viewer, or None (no cookie, forged, expired, or its key was revoked)."""
    settings: Settings = request.app.state.settings
    key = signing_key(request)
    sess = ui_session.verify(key, request.cookies.get(ui_session.COOKIE_NAME))
    if sess is None:
        return None
    key_name = None
    tenant: Tenant | None
    if settings.auth_disabled:
        tenant = get_or_create_tenant(db, LOCAL_TENANT)
        if sess.key_id is not None:
            tenant = None
    elif sess.key_id is None:
        tenant = None
    else:
        row = db.get(ApiKey, sess.key_id)
        valid = row is not None and row.revoked_at is None and row.tenant_id == sess.tenant_id
        tenant = row.tenant if valid and row is not None else None
        key_name = row.name if row is not None else None
    if tenant is None or tenant.id != sess.tenant_id:
        db.rollback()
        return None
    viewer = Viewer(tenant_id=tenant.id, tenant_name=tenant.name, key_id=sess.key_id,
                    key_name=key_name, session=sess, csrf=ui_session.csrf_token(key, sess))
    db.rollback()
    return viewer


def set_session_cookie(request: Request, response: Response, value: str) -> None:
    settings: Settings = request.app.state.settings
    secure = settings.ui_cookie_secure
    if secure is None:
        secure = request.url.scheme == "https"
    response.set_cookie(ui_session.COOKIE_NAME, value, max_age=settings.ui_session_ttl_s,
                        path=ui_session.COOKIE_PATH, secure=secure, httponly=True,
                        samesite="strict")


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(ui_session.COOKIE_NAME, path=ui_session.COOKIE_PATH, httponly=True,
                           samesite="strict")


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site. Browsers send Origin
    on every POST; its absence (curl, old clients) is left to the CSRF token."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


def require_csrf(request: Request, viewer: Viewer, form_token: str | None = None) -> None:
    if not same_origin(request):
        raise HTTPException(403, detail="cross-site request refused")
    token = request.headers.get(CSRF_HEADER) or form_token
    if not ui_session.csrf_ok(signing_key(request), viewer.session, token):
        raise HTTPException(403, detail="missing or stale CSRF token: reload the page and "
                                        "try again")


def safe_next(path: str | None) -> str:
    """Only a dashboard path of this site may be a post-sign-in target (no open redirect)."""
    if path and path.startswith("/ui/") and not path.startswith("//") and "\\" not in path:
        return path
    return "/ui/jobs"
