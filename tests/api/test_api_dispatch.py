"""Dispatchers send only the job id; the embedded worker drives jobs through the crud API."""

from __future__ import annotations

import json
import os
import time

import pytest
from fastapi.testclient import TestClient

from app.crud import jobs as crud
from app.db.session import get_session_factory
from app.dispatch import TASK_NAME, CeleryDispatcher, InProcessDispatcher


class FakeCelery:
    def __init__(self) -> None:
        self.sent: list = []

    def send_task(self, *args, **kwargs):
        self.sent.append((args, kwargs))


def test_celery_dispatcher_sends_the_task_by_name_with_only_the_job_id(settings):
    fake = FakeCelery()
    prod = settings.model_copy(update={"broker_url": "redis://x", "celery_queue": "gpu"})
    CeleryDispatcher(prod, celery_app=fake).enqueue("job-1")
    assert fake.sent == [((TASK_NAME,), {"args": ["job-1"], "queue": "gpu"})]


def test_celery_message_on_real_redis_carries_only_the_job_id(settings):
    redis = pytest.importorskip("redis")
    url = os.environ.get("SLIMGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception:  # noqa: BLE001
        pytest.skip(f"no Redis answers at {url}")
    queue = f"slimgpt-test-{os.getpid()}-{time.monotonic_ns()}"
    prod = settings.model_copy(update={"broker_url": url, "celery_queue": queue})
    try:
        CeleryDispatcher(prod).enqueue("0d9e6c1e-1111-2222-3333-444455556666")
        raw = client.lpop(queue)
        assert raw is not None
        message = json.loads(raw)
        assert message["headers"]["task"] == TASK_NAME
        import base64

        body = json.loads(base64.b64decode(message["body"]))
        assert body[0] == ["0d9e6c1e-1111-2222-3333-444455556666"] and body[1] == {}
    finally:
        client.delete(queue)
        client.close()


def _fake_runner(settings):
    factory = get_session_factory(settings)

    def run(job_id: str) -> None:
        with factory() as s:
            if crud.claim_job(s, job_id, "inproc", 60) is None:
                return
            for i in range(2):
                crud.add_event(s, job_id, phase="pruning", message=f"layer {i}", layer=i,
                               num_layers=2, percent=50.0 * (i + 1))
            crud.finish_job(s, job_id, "succeeded",
                            metrics={"params_before": 100, "params_after": 80})

    return run


def test_embedded_worker_runs_a_job_to_succeeded(settings, tenant):
    from app.main import create_app

    d = InProcessDispatcher(_fake_runner(settings))
    with TestClient(create_app(settings, dispatcher=d)) as c:
        job = c.post("/v1/jobs", json={"model_id": "a/b", "target_ratio": 0.2},
                     headers=tenant.headers).json()
        assert d.wait_idle(20)
        got = c.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json()
    d.stop()
    assert got["state"] == "succeeded" and got["metrics"]["params_after"] == 80


def test_runner_exception_fails_the_job(settings, tenant):
    from app.main import create_app

    def boom(job_id: str) -> None:
        with get_session_factory(settings)() as s:
            crud.claim_job(s, job_id, "inproc", 60)
        raise RuntimeError("kaput")

    d = InProcessDispatcher(boom, get_session_factory(settings))
    with TestClient(create_app(settings, dispatcher=d)) as c:
        job = c.post("/v1/jobs", json={"model_id": "a/b", "target_ratio": 0.2},
                     headers=tenant.headers).json()
        assert d.wait_idle(20)
        got = c.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json()
    d.stop()
    assert got["state"] == "failed" and "kaput" in got["error"]


def test_embedded_app_builds_an_in_process_dispatcher_and_recovers_queued_jobs(settings, tenant,
                                                                               submit):
    from app.main import create_app

    leftover = submit()  # queued, never run (as after a restart)
    ran: list[str] = []
    app = create_app(settings, runner=ran.append)
    assert isinstance(app.state.dispatcher, InProcessDispatcher)
    with TestClient(app):
        assert app.state.dispatcher.wait_idle(20)
    assert leftover["id"] in ran
