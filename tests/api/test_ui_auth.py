"""Dashboard sign-in: the key travels once in a POST body; the session is an HttpOnly,
SameSite=Strict, signed, expiring cookie that dies with its key; changes need a CSRF token."""

from __future__ import annotations

import time

import pytest

from app.crud.tenants import revoke_api_key
from app.ui import session as ui_session
from tests.api.ui_support import browser_client, csrf_of, sign_in, use_cookie


def _cookie_header(response) -> str:
    return response.headers["set-cookie"]


def test_sign_in_sets_an_httponly_samesite_strict_expiring_cookie(app, tenant, settings):
    c = browser_client(app)
    r = c.post("/ui/login", data={"api_key": tenant.key, "next": "/ui/fleet"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/fleet"
    header = _cookie_header(r)
    assert header.startswith(f"{ui_session.COOKIE_NAME}=")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/ui",
                      f"Max-Age={settings.ui_session_ttl_s}"):
        assert attribute in header
    assert "Secure" not in header  # plain http in this test; see the https test below


def test_the_cookie_is_secure_over_https(app, tenant):
    c = browser_client(app)
    c.base_url = "https://testserver"
    r = c.post("/ui/login", data={"api_key": tenant.key})
    assert "Secure" in _cookie_header(r)


def test_the_cookie_names_the_key_id_but_never_contains_the_key(app, tenant):
    c = sign_in(app, tenant)
    value = c.cookies[ui_session.COOKIE_NAME]
    assert tenant.key not in value and tenant.key.split("_")[2] not in value
    session = ui_session.verify(app.state.ui_signing_key, value)
    assert session is not None and session.key_id == tenant.key_id
    assert session.tenant_id == tenant.tenant_id


def test_a_wrong_key_shows_an_error_and_sets_no_cookie(app):
    c = browser_client(app)
    r = c.post("/ui/login", data={"api_key": "sgk_nope_nothing"})
    assert r.status_code == 401
    assert "not valid" in r.text and "set-cookie" not in r.headers
    assert "sgk_nope_nothing" not in r.text  # never echoed back


def test_pages_redirect_to_sign_in_and_come_back(app):
    c = browser_client(app)
    r = c.get("/ui/jobs?state=running")
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login?next=/ui/jobs%3Fstate%3Drunning"
    page = c.get(r.headers["location"]).text
    assert 'type="password"' in page and 'method="post"' in page
    assert 'value="/ui/jobs?state=running"' in page


def test_sign_in_never_redirects_off_site(app, tenant):
    c = browser_client(app)
    for target in ("https://evil.example/", "//evil.example/x", "/v1/jobs", "/ui\\..\\x"):
        r = c.post("/ui/login", data={"api_key": tenant.key, "next": target})
        assert r.headers["location"] == "/ui/jobs"


def test_a_tampered_cookie_is_refused(app, tenant):
    c = sign_in(app, tenant)
    payload, signature = c.cookies[ui_session.COOKIE_NAME].split(".")
    forged = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    use_cookie(c, f"{payload}.{forged}")
    assert c.get("/ui/jobs").status_code == 303


def test_a_cookie_signed_with_another_secret_is_refused(app, tenant):
    value, _ = ui_session.issue(b"x" * 32, key_id=tenant.key_id, tenant_id=tenant.tenant_id,
                                ttl_s=600)
    c = browser_client(app)
    use_cookie(c, value)
    assert c.get("/ui/jobs").status_code == 303


def test_an_expired_session_is_refused(app, tenant):
    key = ui_session.signing_key(app.state.settings)
    value, _ = ui_session.issue(key, key_id=tenant.key_id, tenant_id=tenant.tenant_id, ttl_s=60,
                                now=time.time() - 120)
    fresh, _ = ui_session.issue(key, key_id=tenant.key_id, tenant_id=tenant.tenant_id, ttl_s=60)
    c = browser_client(app)
    use_cookie(c, fresh)
    assert c.get("/ui/jobs").status_code == 200  # the same cookie, unexpired, is accepted
    use_cookie(c, value)
    assert c.get("/ui/jobs").status_code == 303


def test_revoking_the_key_ends_its_sessions(app, tenant, db):
    c = sign_in(app, tenant)
    assert c.get("/ui/jobs").status_code == 200
    with db() as s:
        revoke_api_key(s, tenant.key_id)
    assert c.get("/ui/jobs").status_code == 303
    assert c.get("/ui/stream").status_code == 401


def test_sign_out_clears_the_cookie(app, tenant):
    c = sign_in(app, tenant)
    r = c.post("/ui/logout", data={"csrf_token": csrf_of(c)})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert ui_session.COOKIE_NAME not in c.cookies
    assert c.get("/ui/jobs").status_code == 303


def test_the_v1_api_ignores_the_session_cookie(app, tenant):
    c = sign_in(app, tenant)
    value = c.cookies[ui_session.COOKIE_NAME]
    r = c.get("/v1/jobs", headers={"Cookie": f"{ui_session.COOKIE_NAME}={value}"})
    assert r.status_code == 401


@pytest.mark.parametrize("how", ["no token", "wrong token", "other site"])
def test_cancel_needs_a_csrf_token_from_the_same_site(app, tenant, submit, how):
    job = submit()
    c = sign_in(app, tenant)
    token = csrf_of(c)
    data = {"csrf_token": token if how != "wrong token" else token[::-1]}
    if how == "no token":
        data = {}
    headers = {"Origin": "https://evil.example"} if how == "other site" else {}
    r = c.post(f"/ui/jobs/{job['id']}/cancel", data=data, headers=headers)
    assert r.status_code == 403
    assert c.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json()["state"] == "queued"
    # The same request from the page itself goes through.
    ok = c.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf_token": token})
    assert ok.status_code == 303
    assert c.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json()["state"] == "cancelled"


def test_submit_needs_the_csrf_header(app, tenant, job_body):
    c = sign_in(app, tenant)
    assert c.post("/ui/jobs", json=job_body).status_code == 403
    r = c.post("/ui/jobs", json=job_body, headers={"X-CSRF-Token": csrf_of(c)})
    assert r.status_code == 202


def test_sign_in_from_another_site_is_refused(app, tenant):
    c = browser_client(app)
    r = c.post("/ui/login", data={"api_key": tenant.key},
               headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers


def test_a_key_in_the_query_string_is_not_a_sign_in(app, tenant):
    c = browser_client(app)
    r = c.get(f"/ui/login?api_key={tenant.key}")
    assert r.status_code == 200 and "set-cookie" not in r.headers


def test_sessions_are_shared_by_replicas_with_the_same_secret(app, tenant, settings):
    from app.main import create_app

    replica = create_app(settings)
    c = sign_in(app, tenant)
    other = browser_client(replica)
    use_cookie(other, c.cookies[ui_session.COOKIE_NAME])
    assert other.get("/ui/jobs").status_code == 200
