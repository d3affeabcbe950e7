"""The request path under dependency faults, on real processes: `slimgpt serve` subprocesses on
a private Postgres (stopped and started again under them) and a private redis-server
(SIGSTOPped while requests are in flight). Bounded waits: docs/RELIABILITY.md, "Request path".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db.migrate import upgrade
from tests.stack import PrivatePostgres, PrivateRedis, Stack, wait_until

from .conftest import Api

#: "No request blocks more than ~2 s on a dead or hung dependency", with room for a loaded
#: 2-core machine (the waits themselves are 1.5-2 s).
BOUND_S = 2.5


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    try:
        server = PrivatePostgres()
        server.start()
    except RuntimeError as err:
        pytest.skip(str(err))
    try:
        upgrade(server.url)
        yield server
    finally:
        server.close()


def _timed(client: httpx.Client, method: str, path: str, **kw: Any) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = client.request(method, path, **kw)
    return r, time.monotonic() - start


def test_a_stopped_database_gives_503_with_retry_after_then_recovers_by_itself(
        private_pg: PrivatePostgres, redis_server: PrivateRedis, tmp_path: Path) -> None:
    stack = Stack(private_pg.url, tmp_path, redis_url=redis_server.url)
    try:
        url = stack.start_api("api")
        api = Api(url, stack.api_key())
        job_id = api.submit()
        private_pg.stop("fast")
        stopped = time.monotonic()
        try:
            answers = [
                _timed(api.http, "GET", "/v1/jobs"),
                _timed(api.http, "GET", f"/v1/jobs/{job_id}"),
                _timed(api.http, "POST", "/v1/jobs",
                       json={"model_id": "test/fake", "target_ratio": 0.2}),
                _timed(api.http, "GET", f"/v1/jobs/{job_id}/events"),
                _timed(api.http, "GET", "/v1/hub-token"),
            ]
            health, health_s = _timed(api.http, "GET", "/healthz")
            ready, ready_s = _timed(api.http, "GET", "/readyz")
        finally:
            private_pg.start()
        restarted = time.monotonic()
        for r, seconds in answers:
            assert r.status_code == 503, (r.request.url, r.text)
            assert int(r.headers["Retry-After"]) > 0
            assert seconds < BOUND_S, (r.request.url, seconds)
        assert health.status_code == 200 and health_s < BOUND_S
        assert ready.status_code == 503 and ready_s < BOUND_S
        assert ready.json()["checks"]["database"].startswith("unreachable")

        # No restart of the API: its pool replaces the dead connections by itself.
        wait_until(lambda: api.http.get("/v1/jobs").status_code == 200, 30,
                   "the API to answer again", stack.logs)
        recovered_s = time.monotonic() - restarted
        assert api.job(job_id)["id"] == job_id
        assert api.http.get("/readyz").json()["checks"]["database"] == "ok"
        print(f"\nFIGURE postgres_stopped slowest_503_s={max(s for _, s in answers):.2f} "
              f"healthz_s={health_s:.2f} readyz_s={ready_s:.2f} "
              f"outage_s={restarted - stopped:.2f} recovered_after_start_s={recovered_s:.2f}")
        api.close()
    finally:
        stack.close()


def test_a_hung_redis_leaves_healthz_and_readyz_answering_under_45_slow_requests(
        pg_url: str, redis_server: PrivateRedis, tmp_path: Path) -> None:
    stack = Stack(pg_url, tmp_path, redis_url=redis_server.url)
    try:
        url = stack.start_api("api")
        api = Api(url, stack.api_key())
        assert api.http.get("/readyz").status_code == 200
        redis_server.pause()
        try:
            with httpx.Client(base_url=url, timeout=30) as probe, ThreadPoolExecutor(50) as pool:
                # 45 readiness checks in flight against the hung broker, each of which used to
                # hold a request thread for the broker's socket timeout.
                slow = [pool.submit(_timed, probe, "GET", "/readyz") for _ in range(45)]
                time.sleep(0.3)
                health, health_s = _timed(probe, "GET", "/healthz")
                ready, ready_s = _timed(probe, "GET", "/readyz")
                listed, listed_s = _timed(api.http, "GET", "/v1/jobs")
                in_flight = [f.result() for f in slow]
        finally:
            redis_server.resume()
        assert health.status_code == 200 and health_s < BOUND_S, health_s
        assert ready.status_code == 503 and ready_s < BOUND_S, ready_s
        checks = ready.json()["checks"]
        assert checks["broker"].startswith("unreachable") and checks["database"] == "ok"
        assert listed.status_code == 200 and listed_s < BOUND_S, listed_s
        assert all(r.status_code == 503 for r, _ in in_flight)
        slowest = max(s for _, s in in_flight)
        assert slowest < BOUND_S, slowest
        wait_until(lambda: api.http.get("/readyz").status_code == 200, 15,
                   "readiness once Redis answers again", stack.logs)
        print(f"\nFIGURE redis_sigstop_readyz in_flight=45 slowest_readyz_s={slowest:.2f} "
              f"healthz_s={health_s:.2f} readyz_s={ready_s:.2f} list_jobs_s={listed_s:.2f}")
        api.close()
    finally:
        stack.close()


def test_two_api_replicas_share_a_tenants_rate_limit(
        pg_url: str, redis_server: PrivateRedis, tmp_path: Path) -> None:
    # One request per 10 s after a burst of 4: nothing refills while the test runs.
    stack = Stack(pg_url, tmp_path, redis_url=redis_server.url, rate_limit_per_minute=6,
                  rate_limit_burst=4)
    try:
        a, b = stack.start_api("api-a"), stack.start_api("api-b")
        key, other = stack.api_key(), stack.api_key("other")
        replicas = [Api(a, key), Api(b, key)]
        answers = [replicas[i % 2].http.get("/v1/jobs") for i in range(6)]
        assert [r.status_code for r in answers] == [200] * 4 + [429] * 2
        assert all(1 <= int(r.headers["Retry-After"]) <= 10 for r in answers[4:])
        assert all(Api(u, other).http.get("/v1/jobs").status_code == 200 for u in (a, b))
        for api in replicas:
            api.close()
    finally:
        stack.close()
