"""Per-tenant limits: request rate, queued jobs, upload bytes; 429 + Retry-After, other tenants
unaffected. On SQLite and PostgreSQL. (Two API processes sharing one limit:
tests/reliability/test_request_faults.py.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from app.api import limits
from app.core.config import Settings
from tests.api.conftest import JOB, TenantCtx


@pytest.fixture
def limited(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """A client of an app with the given limits (on the session's test database)."""
    from app.main import create_app

    clients: list[TestClient] = []

    def make(**limits_: Any) -> TestClient:
        unlimited = {"rate_limit_per_minute": 0, "max_queued_jobs_per_tenant": 0,
                     "upload_bytes_per_day": 0}
        c = TestClient(create_app(settings.model_copy(update={**unlimited, **limits_})))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def _retry_after(r: Any) -> int:
    return int(r.headers["Retry-After"])


# -- request rate ----------------------------------------------------------------------------

def test_requests_over_the_burst_get_429_with_retry_after(limited, tenant):
    # One request per 10 s after the burst: no refill while the test runs, however slow.
    c = limited(rate_limit_per_minute=6, rate_limit_burst=3)
    codes = [c.get("/v1/jobs", headers=tenant.headers).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = c.get("/v1/jobs", headers=tenant.headers)
    assert r.status_code == 429 and 1 <= _retry_after(r) <= 10
    assert "rate limit" in r.json()["detail"]


def test_a_rate_limited_tenant_does_not_limit_another(limited, tenant, other_tenant):
    c = limited(rate_limit_per_minute=6, rate_limit_burst=2)
    for _ in range(3):
        c.get("/v1/jobs", headers=tenant.headers)
    assert c.get("/v1/jobs", headers=tenant.headers).status_code == 429
    assert c.get("/v1/jobs", headers=other_tenant.headers).status_code == 200


def test_the_rate_limit_is_kept_in_the_database_so_app_instances_share_it(limited, tenant):
    a = limited(rate_limit_per_minute=6, rate_limit_burst=2)
    b = limited(rate_limit_per_minute=6, rate_limit_burst=2)
    codes = [x.get("/v1/jobs", headers=tenant.headers).status_code for x in (a, b, a, b)]
    assert codes == [200, 200, 429, 429]


def test_the_rate_refills_one_request_per_interval(db, tenant, settings):
    s = settings.model_copy(update={"rate_limit_per_minute": 60, "rate_limit_burst": 2})
    with db() as session:
        limits.check_request_rate(session, tenant.tenant_id, s, now=1000.0)
        limits.check_request_rate(session, tenant.tenant_id, s, now=1000.0)
        with pytest.raises(HTTPException) as refused:
            limits.check_request_rate(session, tenant.tenant_id, s, now=1000.5)
        assert refused.value.status_code == 429
        assert refused.value.headers == {"Retry-After": "1"}
        limits.check_request_rate(session, tenant.tenant_id, s, now=1001.0)  # one more refilled
        with pytest.raises(HTTPException):
            limits.check_request_rate(session, tenant.tenant_id, s, now=1001.0)


def test_requests_without_an_api_key_are_not_counted(limited, tenant):
    c = limited(rate_limit_per_minute=6, rate_limit_burst=1)
    for _ in range(3):
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/jobs").status_code == 401
    assert c.get("/v1/jobs", headers=tenant.headers).status_code == 200


# -- queued jobs -----------------------------------------------------------------------------

def test_submissions_over_the_queued_job_limit_get_429(limited, tenant):
    c = limited(max_queued_jobs_per_tenant=2)
    codes = [c.post("/v1/jobs", json=JOB, headers=tenant.headers).status_code for _ in range(3)]
    assert codes == [202, 202, 429]
    r = c.post("/v1/jobs", json=JOB, headers=tenant.headers)
    assert _retry_after(r) == limits.QUEUE_FULL_RETRY_AFTER_S and "queued" in r.json()["detail"]


def test_a_full_queue_of_one_tenant_does_not_limit_another(limited, tenant, other_tenant):
    c = limited(max_queued_jobs_per_tenant=1)
    assert c.post("/v1/jobs", json=JOB, headers=tenant.headers).status_code == 202
    assert c.post("/v1/jobs", json=JOB, headers=tenant.headers).status_code == 429
    assert c.post("/v1/jobs", json=JOB, headers=other_tenant.headers).status_code == 202


def test_a_job_leaving_the_queue_makes_room(limited, tenant):
    c = limited(max_queued_jobs_per_tenant=1)
    job = c.post("/v1/jobs", json=JOB, headers=tenant.headers).json()
    assert c.post("/v1/jobs", json=JOB, headers=tenant.headers).status_code == 429
    assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers).status_code == 202
    assert c.post("/v1/jobs", json=JOB, headers=tenant.headers).status_code == 202


def test_an_idempotent_replay_is_answered_even_with_a_full_queue(limited, tenant):
    c = limited(max_queued_jobs_per_tenant=1)
    first = c.post("/v1/jobs", json=JOB, headers={**tenant.headers, "Idempotency-Key": "k1"})
    again = c.post("/v1/jobs", json=JOB, headers={**tenant.headers, "Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]


def test_concurrent_submissions_cannot_overrun_the_queued_job_limit(limited, tenant, db):
    c = limited(max_queued_jobs_per_tenant=3)

    def post(_: int) -> int:
        return c.post("/v1/jobs", json=JOB, headers=tenant.headers).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(post, range(8)))
    assert sorted(codes) == [202] * 3 + [429] * 5


# -- upload bytes ----------------------------------------------------------------------------

def _upload(c: TestClient, ctx: TenantCtx, data: bytes, chunked: bool = False) -> Any:
    content: Any = iter([data[:100], data[100:]]) if chunked else data
    return c.post("/v1/files", params={"filename": "calib.txt"}, content=content,
                  headers={**ctx.headers, "content-type": "text/plain"})


def test_uploads_over_the_daily_bytes_get_429_with_retry_after(limited, tenant):
    c = limited(upload_bytes_per_day=1000)
    assert _upload(c, tenant, b"x" * 600).status_code == 201
    r = _upload(c, tenant, b"x" * 600)
    assert r.status_code == 429 and "upload limit" in r.json()["detail"]
    # The 600 bytes already stored leave the window 24 hours after they arrived.
    assert 86_000 < _retry_after(r) <= 86_400


def test_an_upload_that_goes_over_the_limit_while_streaming_gets_429_and_leaves_no_file(
        limited, tenant, settings):
    c = limited(upload_bytes_per_day=1000)
    assert _upload(c, tenant, b"x" * 600).status_code == 201
    before = set(Path(settings.uploads_dir).iterdir())  # type: ignore[arg-type]
    r = _upload(c, tenant, b"y" * 600, chunked=True)  # no Content-Length: found while reading
    assert r.status_code == 429
    assert set(Path(settings.uploads_dir).iterdir()) == before  # type: ignore[arg-type]


def test_the_upload_limit_is_per_tenant(limited, tenant, other_tenant):
    c = limited(upload_bytes_per_day=1000)
    assert _upload(c, tenant, b"x" * 900).status_code == 201
    assert _upload(c, tenant, b"x" * 200).status_code == 429
    assert _upload(c, other_tenant, b"x" * 900).status_code == 201


def test_uploads_within_the_limit_are_stored(limited, tenant):
    c = limited(upload_bytes_per_day=1000)
    sizes = [_upload(c, tenant, b"x" * 500).status_code for _ in range(2)]
    assert sizes == [201, 201]
