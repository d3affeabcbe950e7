"""Engine and session factory for SQLite (embedded) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.core.config import Settings, get_settings

_lock = threading.Lock()
_engines: dict[tuple[str, DbTimeouts | None], Engine] = {}


@dataclass(frozen=True)
class DbTimeouts:
    """How long a database call may wait, so that a dead or hung database costs a request a
    bounded time (then a 503) rather than a thread for as long as TCP cares to wait."""

    #: connecting, waiting for a pooled connection, waiting for a lock (s)
    wait_s: float = 2.0
    #: one statement (Postgres ``statement_timeout``) (s)
    statement_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DbTimeouts:
        return cls(settings.db_timeout_s, settings.db_statement_timeout_s)


def _postgres_connect_args(timeouts: DbTimeouts) -> dict[str, Any]:
    statement_ms, lock_ms = int(timeouts.statement_s * 1000), int(timeouts.wait_s * 1000)
    return {
        # libpq counts whole seconds and treats anything below 2 as 2.
        "connect_timeout": max(2, math.ceil(timeouts.wait_s)),
        "options": f"-c statement_timeout={statement_ms} -c lock_timeout={lock_ms}",
        # A vanished host (not a refused port) is noticed by TCP: unacknowledged data after
        # tcp_user_timeout, an idle connection after the keepalive probes (~20 s).
        "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 2,
        "tcp_user_timeout": statement_ms + lock_ms,
    }


def make_engine(url: str, *, null_pool: bool = False, connect_timeout: float | None = None,
                timeouts: DbTimeouts | None = None) -> Engine:
    """A new engine. SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` transactions, so
    every write transaction is serialized (that is what makes lease claims atomic there).
    ``connect_timeout`` (seconds) bounds a PostgreSQL connection attempt; ``timeouts`` bounds
    every wait (the service's engines; migrations run without it)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kw: dict = {"poolclass": NullPool} if null_pool else {}
        busy_s = timeouts.wait_s if timeouts is not None else 30.0
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_s},
                               **kw)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # let SQLAlchemy emit BEGIN itself
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args: dict[str, Any] = {}
    if timeouts is not None:
        connect_args = _postgres_connect_args(timeouts)
    if connect_timeout is not None:
        connect_args["connect_timeout"] = max(1, int(connect_timeout))
    if null_pool:
        return create_engine(url, poolclass=NullPool, connect_args=connect_args)
    # pool_pre_ping: a connection that died with the database (restart, failover) is replaced
    # on checkout, so the service recovers by itself once the database answers again.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         pool_timeout=timeouts.wait_s if timeouts is not None else 30.0,
                         connect_args=connect_args)


def get_engine(settings: Settings | None = None, *, requests: bool = False) -> Engine:
    """The process-wide engine for ``settings.database_url`` (created once per URL and kind).

    ``requests``: the API's engine, every wait bounded by SLIMGPT_DB_TIMEOUT_S and
    SLIMGPT_DB_STATEMENT_TIMEOUT_S, so that a request answers 503 rather than holding a thread
    on a dead or hung database. Workers keep the patient engine: they ride out short outages
    and lock waits themselves (a job must not fail because a commit waited 3 s)."""
    settings = settings or get_settings()
    key = (str(settings.database_url), DbTimeouts.from_settings(settings) if requests else None)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(key[0], timeouts=key[1])
        return engine


def dispose_engines(url: str) -> None:
    """Close and forget this process's engines of ``url`` (e.g. before dropping a database)."""
    with _lock:
        doomed = [key for key in _engines if key[0] == url]
        engines = [_engines.pop(key) for key in doomed]
    for engine in engines:
        engine.dispose()


def forget_inherited_connections() -> None:
    """In a forked child: never use the parent's pooled connections (call first thing)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)


def get_session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (for the worker and the CLI)."""
    session = get_session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
