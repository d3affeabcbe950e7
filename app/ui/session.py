"""Dashboard sessions: a signed, expiring cookie that names an API key, never contains it.

The browser sends the API key once, in the body of the sign-in POST. The server answers with a
cookie ``<payload>.<signature>``: the payload holds the key id, the tenant id, the expiry and a
random nonce; the signature is HMAC-SHA256 under a key derived from ``SLIMGPT_SECRET_KEY`` (so
every API replica accepts every replica's cookies). Each request re-reads the key row: a revoked
key ends its sessions at once. The CSRF token of a session is an HMAC of its nonce; state-changing
requests must carry it (and a same-origin ``Origin`` header when the browser sends one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from app.core.config import Settings

COOKIE_NAME = "slimgpt_session"
#: The cookie is only sent to the dashboard, never to /v1 (which authenticates by header).
COOKIE_PATH = "/ui"
_SIGNING_CONTEXT = b"slimgpt-ui-session-v1"
_CSRF_CONTEXT = b"slimgpt-ui-csrf-v1"


@dataclass(frozen=True)
class UiSession:
    key_id: str | None  # None only with SLIMGPT_AUTH_DISABLED
    tenant_id: str
    expires_at: int
    nonce: str


def signing_key(settings: Settings) -> bytes:
    """A key for sessions only, derived from the service secret (never used as-is)."""
    return hmac.new(settings.fernet_key(), _SIGNING_CONTEXT, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(key: bytes, *, key_id: str | None, tenant_id: str, ttl_s: int,
          now: float | None = None) -> tuple[str, UiSession]:
    """A new cookie value and the session it carries."""
    session = UiSession(key_id=key_id, tenant_id=tenant_id,
                        expires_at=int((now or time.time()) + ttl_s),
                        nonce=secrets.token_urlsafe(16))
    payload = _b64(json.dumps({"k": session.key_id, "t": session.tenant_id,
                               "e": session.expires_at, "n": session.nonce},
                              separators=(",", ":")).encode())
    signature = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}", session


def verify(key: bytes, value: str | None, now: float | None = None) -> UiSession | None:
    """The session in a cookie value, or None if it is malformed, forged or expired."""
    if not value or value.count(".") != 1 or len(value) > 1024:
        return None
    payload, signature = value.split(".")
    expected = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, signature):
        return None
    try:
        doc = json.loads(_unb64(payload))
        session = UiSession(key_id=doc["k"], tenant_id=str(doc["t"]), expires_at=int(doc["e"]),
                            nonce=str(doc["n"]))
    except (ValueError, KeyError, TypeError):
        return None
    if session.expires_at <= (now or time.time()):
        return None
    return session


def csrf_token(key: bytes, session: UiSession) -> str:
    return _b64(hmac.new(key, _CSRF_CONTEXT + session.nonce.encode(), hashlib.sha256).digest())


def csrf_ok(key: bytes, session: UiSession, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(csrf_token(key, session), presented or "")
