"""A real `slimgpt worker` reports itself through Postgres: its row appears with host, GPU and
build, shows the job it runs, and is marked stopped on a clean shutdown; /metrics and the
fleet page read the same rows."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import sessionmaker

from app.db.migrate import upgrade
from app.db.models import Worker
from app.db.session import make_engine
from app.main import create_app
from tests.stack import Stack

from .conftest import TempPostgres, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def stack(pg_admin: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    db = TempPostgres(pg_admin, prefix="slimgpt_fleet")
    s = Stack(db.url, tmp_path, worker_heartbeat_s=0.5)
    engine = make_engine(db.url, null_pool=True)
    try:
        upgrade(db.url)
        from app.crud.tenants import create_api_key
        from app.db.session import session_scope

        with session_scope(s.settings) as session:
            _, key = create_api_key(session, "fleet")
        with TestClient(create_app(s.settings)) as client:
            yield {"stack": s, "client": client, "headers": {"Authorization": f"Bearer {key}"},
                   "db": sessionmaker(bind=engine, expire_on_commit=False)}
    finally:
        s.close()
        engine.dispose()
        db.close()


def _row(ctx: dict[str, Any], worker_id: str) -> Worker | None:
    with ctx["db"]() as session:
        row = session.get(Worker, worker_id)
        if row is not None:
            session.expunge(row)
        return row


def test_a_celery_worker_reports_itself_and_its_job(stack):
    s: Stack = stack["stack"]
    name = "fleet0"
    # 6 layers x 1 s: the job must still run when /metrics is read below, also on a busy box.
    proc = s.start_worker(name, SLIMGPT_RUNNER="tests.ui.progress_runner:run_job",
                          SLIMGPT_TEST_FAKE_LAYERS="6", SLIMGPT_TEST_FAKE_DELAY_S="1.0")
    node = f"{name}@{s.tag}"
    row = wait_until(lambda: _row(stack, node), 60, "the worker's row", s.logs)
    assert row.kind == "celery" and row.host == socket.gethostname() and row.pid == proc.pid
    assert row.queue == s.settings.celery_queue and row.build["celery"]
    first_beat = row.last_heartbeat_at
    wait_until(lambda: _row(stack, node).last_heartbeat_at > first_beat, 10, "a heartbeat")

    client, headers = stack["client"], stack["headers"]
    r = client.post("/v1/jobs", json={"model_id": "acme/model", "target_ratio": 0.2},
                    headers=headers)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    # While the job runs (in the worker's child process), the row names it.
    wait_until(lambda: _row(stack, node).current_job_id == job_id, 30, "the current job",
               s.logs)
    busy = f'slimgpt_worker_busy{{host="{row.host}",kind="celery",worker="{node}"}} 1.0'
    wait_until(lambda: busy in client.get("/metrics?scope=fleet").text, 5, "the busy gauge")
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}", headers=headers).json()["state"]
               == "succeeded", 60, "the job to succeed", s.logs)
    wait_until(lambda: _row(stack, node).current_job_id is None, 10, "the worker to be idle")
    assert _row(stack, node).jobs_done == 1

    s.term(name)  # a clean shutdown (docker stop) says goodbye
    proc.wait(timeout=30)
    assert _row(stack, node).stopped_at is not None
