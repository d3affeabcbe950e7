"""Fixtures: every API test runs against SQLite and against the real PostgreSQL.

PostgreSQL isolation: each test session creates its own database (``slimgpt_api_<random>``)
through the ``SLIMGPT_TEST_POSTGRES_URL`` server and drops it at the end, so concurrent runs
by other engineers on the same server never see each other's rows.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db import session as db_session
from app.db.migrate import upgrade

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_admin_url() -> str | None:
    """The test server URL, or None (with the reason printed by the skip) if none answers."""
    url = os.environ.get("SLIMGPT_TEST_POSTGRES_URL", DEFAULT_PG)
    engine = create_engine(url, isolation_level="AUTOCOMMIT",
                           connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001
        return None
    finally:
        engine.dispose()
    return url


class TempPostgres:
    """A uniquely named database on the test server, dropped on close."""

    def __init__(self, admin_url: str, prefix: str = "slimgpt_api") -> None:
        self.admin_url = admin_url
        self.name = f"{prefix}_{secrets.token_hex(6)}"
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = make_url(admin_url).set(database=self.name).render_as_string(hide_password=False)

    def close(self) -> None:
        db_session.dispose_engines(self.url)
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    url = postgres_admin_url()
    if url is None:
        pytest.skip("no PostgreSQL answers at SLIMGPT_TEST_POSTGRES_URL "
                    f"({os.environ.get('SLIMGPT_TEST_POSTGRES_URL', DEFAULT_PG)})")
    return url


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "slimgpt.db"
        url = f"sqlite:///{path}"
        upgrade(url)
        yield url
        db_session.dispose_engines(url)
        return
    admin = request.getfixturevalue("pg_admin_url")
    db = TempPostgres(admin)
    try:
        upgrade(db.url)
        yield db.url
    finally:
        db.close()


@pytest.fixture(scope="session")
def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    base = tmp_path_factory.mktemp("data")
    (base / "models").mkdir()
    return Settings(
        data_dir=base,
        database_url=database_url,
        secret_key=Fernet.generate_key().decode(),
        local_models_dir=base / "models",
        max_upload_bytes=64 * 1024,
        max_body_bytes=16 * 1024,
        sse_poll_s=0.02,
        sse_heartbeat_s=0.15,
        auto_migrate=False,
        # No background threads: tests drive jobs through app.crud and run dispatcher passes
        # themselves (the `outbox` fixture).
        dispatcher_enabled=False,
        embedded_worker="",
    )


@dataclass
class RecordingPublisher:
    """A broker stand-in: records every message the dispatcher sends."""

    sent: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    fail: bool = False
    lost: bool = False

    def publish(self, job_id: str, queue: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        with self.lock:
            self.sent.append((job_id, queue))

    def broker_lost_messages(self) -> bool:
        lost, self.lost = self.lost, False
        return lost

    def ping(self) -> bool:
        return not self.fail

    def reset(self) -> None:
        pass

    @property
    def job_ids(self) -> list[str]:
        return [job_id for job_id, _ in self.sent]


@dataclass
class Outbox:
    """A dispatcher on the test database, run one pass at a time (as the leader)."""

    dispatcher: Any
    publisher: RecordingPublisher

    def run_pass(self) -> list[str]:
        """One dispatcher pass; returns the job ids it sent."""
        before = len(self.publisher.sent)
        self.dispatcher.run_pass()
        return self.publisher.job_ids[before:]


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def outbox(settings: Settings) -> Iterator[Outbox]:
    from app.dispatcher import Dispatcher
    from app.leader import SingleProcessLeadership

    publisher = RecordingPublisher()
    prod = settings.model_copy(update={"broker_url": "redis://recording.invalid/0"})
    d = Dispatcher(prod, sessionmaker(bind=db_session.get_engine(settings),
                                      expire_on_commit=False), publisher=publisher,
                   leadership=SingleProcessLeadership(), sweep_grace_s=0)
    try:
        yield Outbox(d, publisher)
    finally:
        d.stop()


@pytest.fixture(scope="session")
def app(settings: Settings) -> Any:
    from app.main import create_app

    return create_app(settings)


@pytest.fixture(scope="session")
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def db(settings: Settings) -> Callable[[], Session]:
    """A session factory on the test database (for crud calls and assertions)."""
    return sessionmaker(bind=db_session.get_engine(settings), expire_on_commit=False)


@dataclass
class TenantCtx:
    name: str
    tenant_id: str
    key_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _make_tenant(db: Callable[[], Session]) -> TenantCtx:
    from app.crud.tenants import create_api_key

    name = f"t-{secrets.token_hex(5)}"
    with db() as s:
        record, full = create_api_key(s, name)
        return TenantCtx(name, record.tenant_id, record.id, full)


@pytest.fixture
def tenant(db: Callable[[], Session]) -> TenantCtx:
    return _make_tenant(db)


@pytest.fixture
def other_tenant(db: Callable[[], Session]) -> TenantCtx:
    return _make_tenant(db)


JOB = {"model_id": "HuggingFaceTB/SmolLM2-135M", "target_ratio": 0.2}


@pytest.fixture
def job_body() -> dict[str, Any]:
    return dict(JOB)


@pytest.fixture
def submit(client: TestClient, tenant: TenantCtx) -> Callable[..., dict[str, Any]]:
    def _submit(body: dict[str, Any] | None = None, ctx: TenantCtx | None = None,
                **headers: str) -> dict[str, Any]:
        r = client.post("/v1/jobs", json=body or JOB,
                        headers={**(ctx or tenant).headers, **headers})
        assert r.status_code == 202, r.text
        return r.json()

    return _submit


@pytest.fixture
def models_dir(settings: Settings) -> Path:
    return Path(settings.local_models_dir)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A brand-new empty database (no migrations applied), dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    db = TempPostgres(request.getfixturevalue("pg_admin_url"), prefix="slimgpt_mig")
    try:
        yield db.url
    finally:
        db.close()
