"""Which process runs the dispatcher: one per deployment, elected through the database.

PostgreSQL: a **lease** row (``dispatcher_leases``, migration 0005). The leader renews its
``expires_at`` (the database's clock) every third of ``SLIMGPT_LEADER_LEASE_S`` on a dedicated
connection, which also ``LISTEN``s for job wake-ups (``app.db.notify``). A candidate (every API
process and every ``slimgpt dispatcher``, every third of the lease) takes the row over when

* the lease expired: the leader's process is frozen (SIGSTOP, a long GC or VM pause), its
  dispatcher thread hangs, or its host vanished; or
* the holder's database session (``backend_pid``) is gone: the process died or lost its
  connection, so a crash is taken over at the next try, without waiting out the lease.

A frozen leader is the reason for the lease. Its TCP connection stays open while it is frozen,
so a session-level advisory lock (what this module used before) stays held: the kernel keeps
answering TCP keepalives for a stopped process, and ``tcp_user_timeout`` does not fire either
(both measured: still held after 12 s with 1 s keepalives). Postgres's
``idle_session_timeout`` does end such a session, but only while the backend is idle: one that
is blocked writing queued NOTIFYs to the frozen client is never ended. The lease does not
depend on what the frozen process's connection does.

**Fencing.** The leader acts without asking the database only within a third of the lease
after the start of its last successful renewal, measured on its own monotonic clock (which
keeps running while the process is stopped); past that, it renews before it acts, and the
renewal fails once another process holds the row. The dispatcher asks
:meth:`PostgresLeadership.fence` before every message it publishes, so a resumed ex-leader
stands down without publishing. A candidate cannot take the row before the whole lease has
passed (database clock, from after the renewal started), which leaves two thirds of the lease
between the two. What is left is a freeze exactly between a check and the publish: the message
is then sent twice, which is harmless, because the job's lease decides which worker runs it.

SQLite: the embedded service is one process, so that process leads.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Protocol

from sqlalchemy.engine import make_url

from app.db.notify import CHANNEL

log = logging.getLogger("slimgpt.leader")

#: The lease row of the dispatcher (one row per elected role).
LEASE_NAME = "dispatcher"
#: How often a wait checks for a stop, a local wake-up or a due renewal.
WAIT_SLICE_S = 0.25

_ENSURE_ROW = ("INSERT INTO dispatcher_leases (name, term) VALUES (%(name)s, 0) "
               "ON CONFLICT (name) DO NOTHING")
# Take or renew in one statement: the row lock orders concurrent candidates, and the second
# one re-reads the row the first has just taken (READ COMMITTED re-checks the WHERE).
_TAKE = """
UPDATE dispatcher_leases AS l SET
    holder = %(me)s,
    backend_pid = pg_backend_pid(),
    term = l.term + CASE WHEN l.holder IS NOT DISTINCT FROM %(me)s THEN 0 ELSE 1 END,
    acquired_at = CASE WHEN l.holder IS NOT DISTINCT FROM %(me)s THEN l.acquired_at
                       ELSE clock_timestamp() END,
    renewed_at = clock_timestamp(),
    expires_at = clock_timestamp() + make_interval(secs => %(lease_s)s)
WHERE l.name = %(name)s
  AND (l.holder IS NULL OR l.holder = %(me)s
       OR l.expires_at IS NULL OR l.expires_at < clock_timestamp()
       OR NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.pid = l.backend_pid))
RETURNING l.term
"""
_RELEASE = ("UPDATE dispatcher_leases SET holder = NULL, backend_pid = NULL, "
            "expires_at = clock_timestamp() WHERE name = %(name)s AND holder = %(me)s")


class Leadership(Protocol):
    def acquire(self) -> bool:
        """True while this process leads (retried by the caller when False)."""

    def fence(self) -> bool:
        """True if this process may act as the leader right now (checked before each send)."""

    def wait(self, timeout: float, wake: threading.Event, stop: threading.Event) -> None:
        """Return after ``timeout``, on a job wake-up, when ``stop`` is set, or when the
        leadership was lost."""

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

    def fence(self) -> bool:
        return True

    def wait(self, timeout: float, wake: threading.Event, stop: threading.Event) -> None:
        _wait_local(timeout, wake, stop)

    def release(self) -> None:
        pass


class PostgresLeadership:
    def __init__(self, database_url: str, lease_s: float = 15.0, *,
                 name: str = LEASE_NAME) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self.conninfo = url.render_as_string(hide_password=False)
        self.lease_s = lease_s
        self.name = name
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.term: int | None = None
        self._conn: Any | None = None
        self._listening = False
        self._leading = False
        self._renew_at = 0.0  # monotonic: from here on, renew before acting

    def acquire(self) -> bool:
        if self._leading and time.monotonic() < self._renew_at:
            return True
        return self._take()

    def fence(self) -> bool:
        if not self._leading:
            return False
        if time.monotonic() < self._renew_at:
            return True
        return self._take()

    # -- the lease ---------------------------------------------------------------------------
    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            # Every statement here is one row: a stuck one must not outlive the lease.
            timeout_ms = max(500, int(self.lease_s / 3 * 1000))
            self._conn = psycopg.connect(
                self.conninfo, autocommit=True, connect_timeout=5, keepalives=1,
                keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                application_name="slimgpt-dispatcher",
                options=f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}")
            self._listening = False
            self._conn.execute(_ENSURE_ROW, {"name": self.name})
        return self._conn

    def _take(self) -> bool:
        import psycopg

        started = time.monotonic()
        try:
            conn = self._connection()
            row = conn.execute(_TAKE, {"me": self.holder, "name": self.name,
                                       "lease_s": self.lease_s}).fetchone()
            if row is not None and not self._listening:
                conn.execute(f"LISTEN {CHANNEL}")
                self._listening = True
        except psycopg.Error as err:
            # The connection is gone, and with it (for the candidates) our backend: another
            # process may take the lease at once, so stand down now and try again later.
            self._close()
            if self._leading:
                log.warning("lost the dispatcher leader connection (%s); standing down", err)
            else:
                log.debug("dispatcher election: database unreachable (%s)", err)
            self._leading = False
            return False
        if row is None:
            if self._leading:
                log.warning("another process took over the dispatcher lease; standing down")
                self._stand_down()
            return False
        if not self._leading or row[0] != self.term:
            log.info("this process is now the dispatcher leader (term %d)", row[0])
        self._leading, self.term = True, int(row[0])
        # Trusted for a third of the lease; a candidate needs all of it (database clock, counted
        # from after this statement started) to pass before it can take the row.
        self._renew_at = started + self.lease_s / 3
        return True

    def _stand_down(self) -> None:
        self._leading = False
        if self._listening and self._conn is not None:
            try:
                self._conn.execute("UNLISTEN *")
                self._listening = False
            except Exception:  # noqa: BLE001 - a broken connection is replaced on the next try
                self._close()

    def _close(self) -> None:
        conn, self._conn, self._listening = self._conn, None, False
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a dead connection may fail to close
                log.debug("closing the leader connection failed", exc_info=True)

    # -- waiting -----------------------------------------------------------------------------
    def wait(self, timeout: float, wake: threading.Event, stop: threading.Event) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while not stop.is_set() and not wake.is_set():
            now = time.monotonic()
            if self._leading and now >= self._renew_at and not self._take():
                return  # lost the lease: the caller sees it on its next acquire()
            remaining = deadline - now
            if remaining <= 0:
                return
            slice_s = min(WAIT_SLICE_S, remaining)
            conn = self._conn if self._listening else None
            if conn is None:
                wake.wait(slice_s)
                continue
            try:
                if any(True for _ in conn.notifies(timeout=slice_s, stop_after=1)):
                    # A burst of submissions is one pass: take what else has arrived.
                    for _ in conn.notifies(timeout=0):
                        pass
                    return
            except psycopg.Error:
                log.warning("lost the dispatcher leader connection; standing down")
                self._close()
                self._leading = False
                return

    def release(self) -> None:
        """Give the lease up (a clean stop): a candidate takes over at its next try."""
        if self._leading and self._conn is not None:
            try:
                self._conn.execute(_RELEASE, {"me": self.holder, "name": self.name})
            except Exception:  # the lease then expires by itself
                log.debug("releasing the dispatcher lease failed", exc_info=True)
        self._leading = False
        self._close()


def make_leadership(database_url: str, lease_s: float = 15.0) -> Leadership:
    if make_url(database_url).get_backend_name() == "postgresql":
        return PostgresLeadership(database_url, lease_s)
    return SingleProcessLeadership()
