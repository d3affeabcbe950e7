"""Dispatching: the outbox dispatcher publishes committed jobs (only their id, task id = job id),
re-sends lost ones, sweeps expired leases, is elected once per database; the embedded worker
takes queued jobs straight from the database."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.crud import jobs as crud
from app.db import notify
from app.db.base import utcnow
from app.db.models import Job
from app.db.session import get_session_factory
from app.dispatch import TASK_NAME, CeleryPublisher, queue_for_job
from app.leader import PostgresLeadership, SingleProcessLeadership
from worker.embedded import EmbeddedWorker

REDIS_URL = os.environ.get("SLIMGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


class FakeCelery:
    def __init__(self) -> None:
        self.sent: list = []

    def send_task(self, *args, **kwargs):
        self.sent.append((args, kwargs))


def test_the_publisher_sends_the_task_by_name_with_only_the_job_id_as_task_id(settings):
    fake = FakeCelery()
    prod = settings.model_copy(update={"broker_url": "redis://x", "celery_queue": "gpu"})
    CeleryPublisher(prod, celery_app=fake).publish("job-1", "gpu")
    assert fake.sent == [((TASK_NAME,), {"args": ["job-1"], "task_id": "job-1", "queue": "gpu",
                                         "retry": False})]


def test_queue_for_job_is_the_configured_queue(settings):
    prod = settings.model_copy(update={"celery_queue": "gpu-a100"})
    assert queue_for_job(Job(model_id="a/b"), prod) == "gpu-a100"


def test_the_message_on_real_redis_carries_only_the_job_id(settings):
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception:  # noqa: BLE001
        pytest.skip(f"no Redis answers at {REDIS_URL}")
    queue = f"slimgpt-test-{os.getpid()}-{time.monotonic_ns()}"
    prod = settings.model_copy(update={"broker_url": REDIS_URL, "celery_queue": queue})
    job_id = "0d9e6c1e-1111-2222-3333-444455556666"
    publisher = CeleryPublisher(prod)
    try:
        publisher.publish(job_id, queue)
        raw = client.lpop(queue)
        assert raw is not None
        message = json.loads(raw)
        assert message["headers"]["task"] == TASK_NAME and message["headers"]["id"] == job_id
        body = json.loads(base64.b64decode(message["body"]))
        assert body[0] == [job_id] and body[1] == {}
    finally:
        publisher.reset()
        client.delete(queue)
        client.close()


def test_a_queued_job_nobody_claims_is_sent_again_after_the_republish_delay(submit, outbox, db):
    job = submit()
    assert job["id"] in outbox.run_pass()
    with db() as s:  # as if republish_after_s had passed
        s.execute(update(Job).where(Job.id == job["id"])
                  .values(next_dispatch_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert job["id"] in outbox.run_pass()
    with db() as s:
        row = s.get(Job, job["id"])
        assert row.dispatch_count == 2
        # The next re-send waits twice as long.
        wait = (row.next_dispatch_at - row.dispatched_at).total_seconds()
        assert wait == pytest.approx(2 * outbox.dispatcher.settings.republish_after_s)


def test_when_the_broker_lost_its_messages_every_queued_job_is_sent_again(submit, outbox):
    job = submit()
    assert job["id"] in outbox.run_pass()
    assert job["id"] not in outbox.run_pass()
    outbox.publisher.lost = True  # e.g. Redis restarted without persistence
    assert job["id"] in outbox.run_pass()


def test_the_sweeper_requeues_a_job_whose_lease_expired_and_sends_it_after_the_backoff(
        submit, outbox, db, settings):
    job = submit()
    outbox.run_pass()
    with db() as s:
        crud.claim_job(s, job["id"], "deadhost:1:x", 60)
        s.execute(update(Job).where(Job.id == job["id"])
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert job["id"] not in outbox.run_pass()  # requeued, but in its backoff
    with db() as s:
        row = s.get(Job, job["id"])
        assert row.state == "queued" and row.lost_count == 1
        assert row.last_error.startswith("lease expired") and "deadhost" in row.last_error
        s.execute(update(Job).where(Job.id == job["id"])
                  .values(next_dispatch_at=utcnow(), available_at=utcnow()))
        s.commit()
    assert job["id"] in outbox.run_pass()


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s"
        time.sleep(0.05)


def test_an_embedded_leader_is_always_elected():
    assert SingleProcessLeadership().acquire()


def test_only_one_postgres_candidate_leads_until_it_steps_down(settings):
    if settings.is_sqlite:
        pytest.skip("leader election through Postgres")
    a, b = PostgresLeadership(str(settings.database_url)), PostgresLeadership(
        str(settings.database_url))
    try:
        assert a.acquire()
        assert not b.acquire()
        a.release()  # a clean stop gives the lease up
        assert b.acquire()
        assert not a.acquire()
    finally:
        a.release()
        b.release()


def test_a_candidate_takes_over_at_once_when_the_leaders_session_is_gone(settings):
    if settings.is_sqlite:
        pytest.skip("leader election through Postgres")
    a, b = (PostgresLeadership(str(settings.database_url), lease_s=60) for _ in range(2))
    try:
        assert a.acquire()
        a._close()  # the process died or lost its connection; the lease has 60 s left
        wait_for(b.acquire, 5)
    finally:
        a.release()
        b.release()


def test_a_frozen_leader_loses_the_lease_once_it_expires_and_does_not_send_after(
        settings, submit, db):
    """The leader's session stays open (a frozen process): only the lease's expiry frees it.
    Resumed, the ex-leader's dispatcher sends nothing and stands down."""
    if settings.is_sqlite:
        pytest.skip("leader election through Postgres")
    from app.dispatcher import Dispatcher
    from tests.api.conftest import RecordingPublisher

    lease_s = 0.9
    url = str(settings.database_url)
    frozen, other = PostgresLeadership(url, lease_s), PostgresLeadership(url, lease_s)
    publisher = RecordingPublisher()
    prod = settings.model_copy(update={"broker_url": "redis://recording.invalid/0"})
    d = Dispatcher(prod, db, publisher=publisher, leadership=frozen, sweep_grace_s=0)
    try:
        assert frozen.acquire()
        assert not other.acquire()  # the lease is live
        t0 = time.monotonic()
        wait_for(other.acquire, 5)  # nobody renewed: taken once the lease ran out
        assert time.monotonic() - t0 >= lease_s * 0.9
        job = submit()
        assert d.publish_due() == 0  # the resumed ex-leader checks before sending
        assert job["id"] not in publisher.job_ids
        assert not frozen.acquire() and other.acquire()
    finally:
        d.stop()
        other.release()


def test_the_leader_is_woken_by_a_commit_in_another_session_within_a_second(settings, submit,
                                                                               db):
    if settings.is_sqlite:
        pytest.skip("NOTIFY is Postgres's; SQLite wakes in-process (covered by the API tests)")
    leader = PostgresLeadership(str(settings.database_url))
    assert leader.acquire()
    try:
        stop, local = threading.Event(), threading.Event()  # only a NOTIFY can end the wait

        def commit_later() -> None:
            time.sleep(0.3)
            with db() as s:
                notify.job_ready(s)
                s.commit()

        threading.Thread(target=commit_later, daemon=True).start()
        t0 = time.monotonic()
        leader.wait(10.0, local, stop)
        assert time.monotonic() - t0 < 1.5
    finally:
        leader.release()


def test_a_running_dispatcher_publishes_a_new_job_at_once_not_at_the_next_sweep(
        settings, client, tenant, job_body, publisher):
    from app.dispatcher import Dispatcher

    slow_sweep = settings.model_copy(update={"broker_url": "redis://recording.invalid/0",
                                             "sweep_interval_s": 30.0})
    d = Dispatcher(slow_sweep, get_session_factory(settings), publisher=publisher)
    d.start()
    try:
        deadline = time.monotonic() + 10
        while not d.is_leader and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # its first pass is done; it now waits up to 30 s
        job_id = client.post("/v1/jobs", json=job_body, headers=tenant.headers).json()["id"]
        t0 = time.monotonic()
        while job_id not in publisher.job_ids and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert job_id in publisher.job_ids
        assert time.monotonic() - t0 < 1.0
    finally:
        d.stop()


# -- the embedded worker ----------------------------------------------------------------------
def _claiming_runner(settings, seen: list[str] | None = None):
    factory = get_session_factory(settings)

    def run(job_id: str) -> None:
        with factory() as s:
            if crud.claim_job(s, job_id, "inproc", 60) is None:
                return
            if seen is not None:
                seen.append(job_id)
            for i in range(2):
                crud.add_event(s, job_id, phase="pruning", message=f"layer {i}", layer=i,
                               num_layers=2, percent=50.0 * (i + 1))
            crud.finish_job(s, job_id, "succeeded",
                            metrics={"params_before": 100, "params_after": 80})

    return run


def _only_this_tenant(settings, tenant_id: str):
    """The API tests share one database: leave other tests' queued jobs alone."""
    inner = _claiming_runner(settings)
    factory = get_session_factory(settings)

    def run(job_id: str) -> None:
        with factory() as s:
            mine = s.get(Job, job_id).tenant_id == tenant_id
            s.rollback()
        if mine:
            inner(job_id)

    return run


def test_the_embedded_worker_takes_a_submitted_job_from_the_database(settings, tenant):
    from app.main import create_app

    w = EmbeddedWorker(settings, _only_this_tenant(settings, tenant.tenant_id))
    with TestClient(create_app(settings, embedded_worker=w)) as c:
        job = c.post("/v1/jobs", json={"model_id": "a/b", "target_ratio": 0.2},
                     headers=tenant.headers).json()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got = c.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json()
            if got["state"] == "succeeded":
                break
            time.sleep(0.05)
    assert got["state"] == "succeeded" and got["metrics"]["params_after"] == 80
    assert not w.alive()


def test_a_runner_exception_fails_the_job(settings, tenant, submit, db):
    job = submit()

    def boom(job_id: str) -> None:
        if job_id != job["id"]:
            return
        with db() as s:
            crud.claim_job(s, job_id, "inproc", 60)
        raise RuntimeError("kaput")

    w = EmbeddedWorker(settings, boom)
    w.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with db() as s:
                row = s.get(Job, job["id"])
                if row.state == "failed":
                    break
            time.sleep(0.05)
    finally:
        w.stop()
    assert row.state == "failed" and "kaput" in row.error


def test_the_embedded_worker_does_not_spin_on_a_job_its_runner_declines(settings, submit):
    job = submit()
    calls: list[str] = []
    w = EmbeddedWorker(settings, calls.append, poll_s=0.05)
    w.start()
    deadline = time.monotonic() + 20
    while job["id"] not in calls and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # ten more polls
    w.stop()
    assert calls.count(job["id"]) == 1


def test_an_embedded_app_runs_jobs_left_queued_by_a_previous_run(settings, tenant, submit):
    from app.main import create_app

    leftover = submit()  # queued, never run (as after a restart)
    ran: list[str] = []
    embedded = settings.model_copy(update={"embedded_worker": "worker.embedded:EmbeddedWorker"})
    app = create_app(embedded, runner=_only_this_tenant_recording(settings, tenant, ran))
    assert isinstance(app.state.embedded_worker, EmbeddedWorker)
    with TestClient(app):
        deadline = time.monotonic() + 20
        while leftover["id"] not in ran and time.monotonic() < deadline:
            time.sleep(0.05)
    assert leftover["id"] in ran


def _only_this_tenant_recording(settings, tenant, ran: list[str]):
    inner = _claiming_runner(settings, ran)
    factory = get_session_factory(settings)

    def run(job_id: str) -> None:
        with factory() as s:
            mine = s.get(Job, job_id).tenant_id == tenant.tenant_id
            s.rollback()
        if mine:
            inner(job_id)

    return run
