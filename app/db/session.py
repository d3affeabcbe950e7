"""Engine and session factory for SQLite (embedded) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.core.config import Settings, get_settings

_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def make_engine(url: str, *, null_pool: bool = False, connect_timeout: float | None = None
                ) -> Engine:
    """A new engine. SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` transactions, so
    every write transaction is serialized (that is what makes lease claims atomic there).
    ``connect_timeout`` (seconds) bounds a PostgreSQL connection attempt."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kw: dict = {"poolclass": NullPool} if null_pool else {}
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kw)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # let SQLAlchemy emit BEGIN itself
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args = {} if connect_timeout is None else {"connect_timeout": max(1, int(connect_timeout))}
    if null_pool:
        return create_engine(url, poolclass=NullPool, connect_args=connect_args)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         connect_args=connect_args)


def get_engine(settings: Settings | None = None) -> Engine:
    """The process-wide engine for ``settings.database_url`` (created once per URL)."""
    url = str((settings or get_settings()).database_url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


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
