"""Fault tests on real processes: the API (`slimgpt serve`) and `slimgpt worker`s as
subprocesses, a private redis-server per module (restarted, killed and paused at will), a
private database on the test Postgres, and the fast fake pipeline of ``fake_runner``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db.migrate import upgrade
from tests.api.conftest import TempPostgres, postgres_admin_url
from tests.stack import PrivateRedis, Stack, wait_until

FAKE_RUNNER = "tests.reliability.fake_runner:run_job"
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    admin = postgres_admin_url()
    if admin is None:
        pytest.skip("no PostgreSQL at SLIMGPT_TEST_POSTGRES_URL")
    db = TempPostgres(admin, prefix="slimgpt_rel")
    try:
        upgrade(db.url)
        yield db.url
    finally:
        db.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except RuntimeError as err:
        pytest.skip(str(err))
    try:
        yield server
    finally:
        server.close()


def make_stack(pg_url: str, tmp: Path, redis_url: str, **overrides: Any) -> Stack:
    out = tmp / "runner"
    out.mkdir(exist_ok=True)
    stack = Stack(pg_url, tmp, redis_url=redis_url, runner=FAKE_RUNNER, **overrides)
    stack.runner_dir = out  # type: ignore[attr-defined]
    stack.extra_env["SLIMGPT_TEST_FAKE_RUNNER_DIR"] = str(out)
    return stack


class Api:
    """A client of a `slimgpt serve` subprocess."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=30)

    def submit(self, model_id: str = "test/fake", **headers: str) -> str:
        r = self.http.post("/v1/jobs", json={"model_id": model_id, "target_ratio": 0.2},
                           headers=headers)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def events(self, job_id: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/v1/jobs/{job_id}/events", headers={"accept": "application/json"})
        assert r.status_code == 200, r.text
        return list(r.json())

    def wait_final(self, job_ids: list[str], timeout: float, stack: Stack) -> dict[str, Any]:
        jobs: dict[str, Any] = {}

        def all_final() -> bool:
            for job_id in job_ids:
                if job_id not in jobs or jobs[job_id]["state"] not in TERMINAL:
                    jobs[job_id] = self.job(job_id)
            return all(j["state"] in TERMINAL for j in jobs.values())

        wait_until(all_final, timeout, "every job to reach a final state", stack.logs,
                   interval=0.2)
        return jobs

    def close(self) -> None:
        self.http.close()


def layer_events(rows: list[dict[str, Any]]) -> list[int]:
    return [e["layer"] for e in rows if (e["metrics"] or {}).get("kind") == "layer_done"]


def completions(stack: Stack, at_least: int = 0, timeout: float = 10.0) -> list[str]:
    """The jobs the fake runner finished, in order. It records a job just *after* marking it
    succeeded, so a test that has seen the state waits (up to ``timeout``) for ``at_least``
    records before reading them: under load the record can trail the state."""
    path = stack.runner_dir / "completions.log"  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        done = ([line.split()[0] for line in path.read_text().splitlines()]
                if path.exists() else [])
        if len(done) >= at_least or time.monotonic() > deadline:
            return done
        time.sleep(0.05)


def event_time(rows: list[dict[str, Any]], needle: str) -> float:
    from datetime import datetime

    for e in rows:
        if needle in e["message"]:
            return datetime.fromisoformat(e["time"]).timestamp()
    raise AssertionError(f"no event with {needle!r}: {[e['message'] for e in rows]}")


def since(t0: float) -> float:
    return time.time() - t0
