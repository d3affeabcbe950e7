"""A dead or hung database: every endpoint answers 503 with Retry-After within the bounded wait
(SLIMGPT_DB_TIMEOUT_S), liveness stays up. (Stopping and restarting a real Postgres under a
running API process: tests/reliability/test_request_faults.py.)"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from app.core.config import Settings
from app.db.session import DbTimeouts, make_engine

JOB_ID = "00000000-0000-0000-0000-000000000000"
FILE_ID = "00000000-0000-0000-0000-000000000001"
#: Every endpoint that reads the database (all of /v1: the API key is looked up there).
ENDPOINTS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/v1/jobs", {}),
    ("POST", "/v1/jobs", {"json": {"model_id": "owner/model", "target_ratio": 0.2}}),
    ("GET", f"/v1/jobs/{JOB_ID}", {}),
    ("POST", f"/v1/jobs/{JOB_ID}/cancel", {}),
    ("GET", f"/v1/jobs/{JOB_ID}/events", {}),
    ("GET", f"/v1/jobs/{JOB_ID}/artifacts", {}),
    ("GET", f"/v1/jobs/{JOB_ID}/artifacts/config.json", {}),
    ("POST", "/v1/files", {"params": {"filename": "c.txt"}, "content": b"text"}),
    ("GET", f"/v1/files/{FILE_ID}", {}),
    ("PUT", "/v1/hub-token", {"json": {"token": "hf_" + "x" * 20}}),
    ("GET", "/v1/hub-token", {}),
    ("DELETE", "/v1/hub-token", {}),
    ("POST", "/v1/estimate", {"json": {"model_id": "owner/model", "target_ratio": 0.2}}),
]
#: Well-formed, so that the API has to ask the database about it.
KEY = {"Authorization": "Bearer sgk_0123456789ab_secret"}


@pytest.fixture(scope="module")
def down_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from cryptography.fernet import Fernet

    from app.main import create_app

    # Nothing listens on port 1: every connection attempt is refused, as when Postgres is down.
    down = Settings(data_dir=tmp_path_factory.mktemp("down"), auto_migrate=False,
                    database_url="postgresql+psycopg://postgres@127.0.0.1:1/nothing",
                    broker_url="redis://127.0.0.1:1/0", secret_key=Fernet.generate_key().decode(),
                    dispatcher_enabled=False)
    with TestClient(create_app(down)) as c:
        yield c


@pytest.mark.parametrize(("method", "path", "kw"), ENDPOINTS,
                         ids=[f"{m} {p}" for m, p, _ in ENDPOINTS])
def test_every_endpoint_answers_503_with_retry_after_when_the_database_is_down(
        down_client, method, path, kw):
    start = time.monotonic()
    r = down_client.request(method, path, headers=KEY, **kw)
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) > 0
    assert "database" in r.json()["detail"]
    assert time.monotonic() - start < 2.5


def test_liveness_does_not_touch_the_database(down_client):
    assert down_client.get("/healthz").json() == {"status": "ok"}


def test_readiness_reports_the_database_down(down_client):
    r = down_client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["database"].startswith("unreachable")


@pytest.fixture
def quick(settings: Settings) -> Iterator[TestClient]:
    """An app that waits at most 0.5 s for a database lock (an engine of its own)."""
    from app.main import create_app

    with TestClient(create_app(settings.model_copy(update={"db_timeout_s": 0.5}))) as c:
        yield c


def _hold_write_lock(database_url: str, job_id: str, release: threading.Event,
                     held: threading.Event) -> None:
    """Another process's transaction that hangs while holding a lock the request needs."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        con = sqlite3.connect(str(url.database), isolation_level=None)
        con.execute("BEGIN IMMEDIATE")  # SQLite: the database's one write lock
        held.set()
        release.wait(30)
        con.execute("ROLLBACK")
        con.close()
        return
    engine = create_engine(database_url)
    with engine.connect() as conn:
        conn.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id})
        held.set()
        release.wait(30)
        conn.rollback()
    engine.dispose()


def test_a_lock_held_by_a_hung_transaction_gives_503_after_the_timeout(
        quick, tenant, submit, settings):
    job = submit()
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_write_lock,
                              args=(str(settings.database_url), job["id"], release, held))
    holder.start()
    try:
        assert held.wait(10)
        start = time.monotonic()
        r = quick.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
        elapsed = time.monotonic() - start
    finally:
        release.set()
        holder.join(30)
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert 0.4 < elapsed < 2.5, elapsed


def test_a_statement_over_the_statement_timeout_is_cancelled(database_url):
    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.skip("statement_timeout is PostgreSQL's")
    engine = make_engine(database_url, timeouts=DbTimeouts(wait_s=2, statement_s=0.3))
    try:
        start = time.monotonic()
        with pytest.raises(OperationalError, match="statement timeout"), engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(5)"))
        assert time.monotonic() - start < 2.0
    finally:
        engine.dispose()
