"""Which process runs the dispatcher: one per deployment, elected through the database.

PostgreSQL: the leader holds a session-level advisory lock on a dedicated connection and
LISTENs there for job wake-ups (``app.db.notify``). When its process or connection dies,
Postgres releases the lock and another candidate (every API process and every
``slimgpt dispatcher`` tries every ``SLIMGPT_SWEEP_INTERVAL_S``) takes over. TCP keepalives
notice a vanished database host within about half a minute.

SQLite: the embedded service is one process, so that process leads.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from typing import Any, Protocol

from sqlalchemy.engine import make_url

from app.db.notify import CHANNEL

log = logging.getLogger("slimgpt.leader")

#: The advisory lock id (advisory locks are per database, so deployments never collide).
LOCK_KEY = zlib.crc32(b"slimgpt-dispatcher")
#: How often a wait checks for a stop or a local wake-up.
WAIT_SLICE_S = 0.25


class Leadership(Protocol):
    def acquire(self) -> bool:
        """True while this process leads (retried by the caller when False)."""

    def wait(self, timeout: float, wake: threading.Event, stop: threading.Event) -> None:
        """Return after ``timeout``, on a job wake-up, or when ``stop`` is set."""

    def release(self) -> None: ...


def _wait_local(timeout: float, wake: threading.Event, stop: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    while not stop.is_set() and not wake.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        wake.wait(min(WAIT_SLICE_S, remaining))


class SingleProcessLeadership:
    """SQLite: the embedded service's process is the only candidate."""

    def acquire(self) -> bool:
        return True

    def wait(self, timeout: float, wake: threading.Event, stop: threading.Event) -> None:
        _wait_local(timeout, wake, stop)

    def release(self) -> None:
        pass


class PostgresLeadership:
    def __init__(self, database_url: str) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self.conninfo = url.render_as_string(hide_password=False)
        self._conn: Any | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None

    def acquire(self) -> bool:
        import psycopg

        if self._conn is not None:
            try:
                self._conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                log.warning("lost the dispatcher leader connection; standing down")
                self.release()
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5,
                                   keepalives=1, keepalives_idle=10, keepalives_interval=5,
                                   keepalives_count=3, application_name="slimgpt-dispatcher")
        except psycopg.Error as err:
            log.debug("dispatcher election: database unreachable (%s)", err)
            return False
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]
            if got:
                conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error:
            conn.close()
            return False
        if not got:
            conn.close()
            return False
        self._conn = conn
        log.info("this process is now the dispatcher leader")
        return True

    def wait(self, timeout: float, wake: threading.Event, stop: threading.Event) -> None:
        import psycopg

        conn = self._conn
        if conn is None:
            _wait_local(timeout, wake, stop)
            return
        deadline = time.monotonic() + timeout
        try:
            while not stop.is_set() and not wake.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if any(True for _ in conn.notifies(timeout=min(WAIT_SLICE_S, remaining),
                                                   stop_after=1)):
                    # A burst of submissions is one pass: take what else has arrived.
                    for _ in conn.notifies(timeout=0):
                        pass
                    return
        except psycopg.Error:
            log.warning("lost the dispatcher leader connection; standing down")
            self.release()

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()  # closing the session releases the advisory lock
            except Exception:  # a dead connection may fail to close
                log.debug("closing the leader connection failed", exc_info=True)


def make_leadership(database_url: str) -> Leadership:
    if make_url(database_url).get_backend_name() == "postgresql":
        return PostgresLeadership(database_url)
    return SingleProcessLeadership()
