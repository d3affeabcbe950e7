"""A real ``celery worker`` process on the real Redis broker: delivery, crash, redelivery."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.stack import Stack, wait_until
from worker.celery_app import make_celery
from worker.settings import WorkerSettings
from worker.tasks import enqueue_job

from .conftest import RedisNamespace


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(predicate, timeout, what)

pytestmark = pytest.mark.timeout(90)


class Workers:
    """`slimgpt worker` processes on the shared test Redis (private prefix and queue), running
    the file-based fake runner (no database)."""

    def __init__(self, ns: RedisNamespace, tmp: Path, **overrides: object) -> None:
        self.ns, self.tmp = ns, tmp
        self.out = tmp / "runner"
        self.out.mkdir(exist_ok=True)
        self.stack = Stack(f"sqlite:///{tmp / 'unused.db'}", tmp, redis_url=ns.url,
                           broker_key_prefix=ns.prefix, celery_queue=ns.queue,
                           unacked_restore_interval_s=0.5,
                           runner="tests.worker.fake_runner:run_job", **overrides)
        self.stack.extra_env["SLIMGPT_TEST_FAKE_RUNNER_DIR"] = str(self.out)
        self.settings = WorkerSettings.model_validate(self.stack.settings.model_dump())

    def start(self, name: str) -> None:
        self.stack.start_worker(name)

    def kill9(self, name: str) -> None:
        self.stack.kill9(name)

    def logs(self) -> str:
        return self.stack.logs()

    def started(self, job_id: str) -> list[Path]:
        return sorted(self.out.glob(f"{job_id}.started.*"))


@pytest.fixture
def workers(redis_ns: RedisNamespace, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(redis_ns, tmp_path)
    try:
        yield w
    finally:
        w.stack.stop_all()


def test_real_worker_runs_a_job(workers: Workers) -> None:
    app = make_celery(workers.settings)
    job_id = f"job-{uuid.uuid4().hex}"
    workers.start("w1")
    enqueue_job(app, job_id)
    done = workers.out / f"{job_id}.done"
    try:
        wait_for(done.exists, 45, "the job to run")
    except AssertionError:
        raise AssertionError(workers.logs()) from None
    assert len(workers.started(job_id)) == 1
    client = redis.Redis.from_url(workers.ns.url)
    # Acknowledged: nothing left queued or unacked under this test's prefix.
    wait_for(lambda: client.hlen(f"{workers.ns.prefix}unacked") == 0, 10, "the ack")
    assert client.llen(f"{workers.ns.prefix}{workers.ns.queue}") == 0


def test_killed_worker_message_is_redelivered_after_the_visibility_timeout(
        redis_ns: RedisNamespace, tmp_path: Path) -> None:
    # Defence in depth only: the service recovers a dead worker's job through its lease within
    # seconds (tests/reliability); Redis also hands the message back, after its visibility
    # timeout, shrunk here from hours to seconds.
    workers = Workers(redis_ns, tmp_path, job_soft_time_limit_s=4, job_hard_time_limit_s=5,
                      visibility_timeout_s=6)
    try:
        _redelivered_after_kill(workers)
    finally:
        workers.stack.stop_all()


def _redelivered_after_kill(workers: Workers) -> None:
    app = make_celery(workers.settings)
    job_id = f"block-{uuid.uuid4().hex}"
    workers.start("w1")
    enqueue_job(app, job_id)
    try:
        wait_for(lambda: bool(workers.started(job_id)), 45, "the first delivery")
    except AssertionError:
        raise AssertionError(workers.logs()) from None
    workers.kill9("w1")
    first_pid = workers.started(job_id)[0].name.rsplit(".", 1)[1]
    client = redis.Redis.from_url(workers.ns.url)
    assert client.hlen(f"{workers.ns.prefix}unacked") == 1  # held, not lost
    assert not (workers.out / f"{job_id}.done").exists()

    workers.start("w2")
    done = workers.out / f"{job_id}.done"
    try:
        wait_for(done.exists, 45, "the redelivered job")
    except AssertionError:
        raise AssertionError(workers.logs()) from None
    assert len(workers.started(job_id)) == 2
    assert done.read_text().strip() != first_pid


def test_lost_pool_child_is_requeued_at_once(workers: Workers) -> None:
    # task_reject_on_worker_lost: when only the child running the job dies (OOM killer), the
    # surviving parent puts the message back immediately, no visibility timeout needed.
    app = make_celery(workers.settings)
    job_id = f"block-{uuid.uuid4().hex}"
    workers.start("w1")
    enqueue_job(app, job_id)
    try:
        wait_for(lambda: bool(workers.started(job_id)), 45, "the first delivery")
    except AssertionError:
        raise AssertionError(workers.logs()) from None
    child_pid = int(workers.started(job_id)[0].name.rsplit(".", 1)[1])
    os.kill(child_pid, signal.SIGKILL)
    done = workers.out / f"{job_id}.done"
    try:
        wait_for(done.exists, 20, "the requeued job")
    except AssertionError:
        raise AssertionError(workers.logs()) from None
    assert len(workers.started(job_id)) == 2
