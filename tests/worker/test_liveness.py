"""The worker's liveness check (`python -m worker.liveness`, the containers' health check)
against a real `celery worker` process: alive while it runs, dead once it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.celery_app import make_celery
from worker.liveness import LivenessFile, heartbeat_age_s, main

from .conftest import RedisNamespace

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(90)


def check(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The health check exactly as the container runs it, in the worker's temp directory."""
    return subprocess.run([sys.executable, "-m", "worker.liveness", *args], check=False,
                          cwd=REPO_ROOT,
                          env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def worker(redis_ns: RedisNamespace, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT),
           "SLIMGPT_BROKER_URL": redis_ns.url, "SLIMGPT_BROKER_KEY_PREFIX": redis_ns.prefix,
           "SLIMGPT_CELERY_QUEUE": redis_ns.queue}
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--hostname",
                             f"live@{redis_ns.queue}"], cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def wait_for_heartbeat(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


def test_the_worker_app_runs_the_heartbeat_step() -> None:
    assert LivenessFile in make_celery().steps["worker"]


def test_a_running_worker_is_alive_and_a_killed_one_is_not(
        worker: subprocess.Popen[bytes], tmp_path: Path) -> None:
    heartbeat = tmp_path / "slimgpt-worker.heartbeat"
    wait_for_heartbeat(heartbeat, worker, tmp_path / "worker.log")
    alive = check(tmp_path)
    assert alive.returncode == 0, alive.stderr

    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    time.sleep(1.5)
    dead = check(tmp_path, "--max-age", "1")
    assert dead.returncode == 1 and "last heartbeat" in dead.stderr


def test_a_worker_stopped_cleanly_removes_its_heartbeat(
        worker: subprocess.Popen[bytes], tmp_path: Path) -> None:
    heartbeat = tmp_path / "slimgpt-worker.heartbeat"
    wait_for_heartbeat(heartbeat, worker, tmp_path / "worker.log")
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=30)
    assert not heartbeat.exists()
    assert check(tmp_path).returncode == 1


def test_the_check_fails_without_a_heartbeat_or_with_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "beat"
    assert heartbeat_age_s(path) is None
    assert main(["--file", str(path)]) == 1
    path.touch()
    assert main(["--file", str(path), "--max-age", "60"]) == 0
    old = time.time() - 120
    os.utime(path, (old, old))
    assert heartbeat_age_s(path) == pytest.approx(120, abs=5)
    assert main(["--file", str(path), "--max-age", "60"]) == 1
