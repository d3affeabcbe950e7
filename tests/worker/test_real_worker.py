"""A real ``celery worker`` process on the real Redis broker: delivery, crash, redelivery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from worker.celery_app import make_celery, worker_argv
from worker.settings import WorkerSettings
from worker.tasks import enqueue_job

from .conftest import RedisNamespace

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(90)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Workers:
    """Starts worker processes in their own process groups and always reaps them."""

    def __init__(self, ns: RedisNamespace, tmp: Path) -> None:
        self.ns, self.tmp = ns, tmp
        self.out = tmp / "runner"
        self.out.mkdir()
        self.procs: list[subprocess.Popen[bytes]] = []
        # Tiny limits so a killed job comes back within seconds; the second delivery of the
        # fake job finishes at once, far below the hard limit.
        self.settings = WorkerSettings(
            broker_url=ns.url,
            queue=ns.queue,
            broker_key_prefix=ns.prefix,
            job_soft_time_limit_s=20,
            job_hard_time_limit_s=25,
            visibility_timeout_s=26,
            unacked_restore_interval_s=0.5,
            runner="tests.worker.fake_runner:run_job",
        )

    def env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        s = self.settings
        env.update(
            SLIMGPT_BROKER_URL=s.broker_url,
            SLIMGPT_QUEUE=s.queue,
            SLIMGPT_BROKER_KEY_PREFIX=s.broker_key_prefix,
            SLIMGPT_JOB_SOFT_TIME_LIMIT_S=str(s.job_soft_time_limit_s),
            SLIMGPT_JOB_HARD_TIME_LIMIT_S=str(s.hard_limit_s),
            SLIMGPT_VISIBILITY_TIMEOUT_S=str(s.visibility_s),
            SLIMGPT_UNACKED_RESTORE_INTERVAL_S=str(s.unacked_restore_interval_s),
            SLIMGPT_RUNNER=s.runner,
            SLIMGPT_TEST_FAKE_RUNNER_DIR=str(self.out),
            PYTHONPATH=str(REPO_ROOT),
        )
        env.update(overrides)
        return env

    def start(self, name: str, settings: WorkerSettings | None = None, **env: str) -> subprocess.Popen[bytes]:
        argv = worker_argv(settings or self.settings, hostname=f"{name}@{self.ns.queue}")
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", *argv],
            cwd=REPO_ROOT, env=self.env(**env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool children (its own process group), like an OOM kill."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log")
        )

    def started(self, job_id: str) -> list[Path]:
        return sorted(self.out.glob(f"{job_id}.started.*"))


@pytest.fixture
def workers(redis_ns: RedisNamespace, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(redis_ns, tmp_path)
    try:
        yield w
    finally:
        w.stop_all()


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


def test_killed_worker_job_is_redelivered_to_another_worker(workers: Workers) -> None:
    # Redelivery after a whole-worker crash is Redis's visibility timeout, so shrink it here.
    fast = workers.settings.model_copy(
        update={"job_soft_time_limit_s": 4, "job_hard_time_limit_s": 5, "visibility_timeout_s": 6}
    )
    workers.settings = fast
    app = make_celery(fast)
    job_id = f"block-{uuid.uuid4().hex}"
    first = workers.start("w1")
    enqueue_job(app, job_id)
    try:
        wait_for(lambda: bool(workers.started(job_id)), 45, "the first delivery")
    except AssertionError:
        raise AssertionError(workers.logs()) from None
    workers.kill9(first)
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
