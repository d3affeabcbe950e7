"""Helpers for the dashboard's server-side tests: a browser-like client per test (its own
cookie jar) signed in with a tenant's key."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import TenantCtx


def browser_client(app: Any) -> TestClient:
    """A fresh client: cookies never leak from one test into another."""
    return TestClient(app, base_url="http://testserver", follow_redirects=False)


def sign_in(app: Any, tenant: TenantCtx) -> TestClient:
    c = browser_client(app)
    r = c.post("/ui/login", data={"api_key": tenant.key, "next": "/ui/jobs"})
    assert r.status_code == 303, r.text
    return c


def csrf_of(c: TestClient, path: str = "/ui/jobs") -> str:
    r = c.get(path)
    assert r.status_code == 200, r.text
    m = re.search(r'name="csrf-token" content="([^"]+)"', r.text)
    assert m is not None
    return m.group(1)


def use_cookie(c: TestClient, value: str) -> None:
    """Present exactly this session cookie value from now on."""
    from app.ui.session import COOKIE_NAME

    c.cookies.clear()
    c.cookies.set(COOKIE_NAME, value, path="/ui")
