"""Dependency checks for /readyz that stay bounded when a dependency hangs.

Each dependency has one :class:`Probe` with a thread of its own. A check runs there, at most one
at a time: concurrent /readyz calls share the check in flight, and each waits for it at most
``timeout`` seconds. So a hung Redis or Postgres (SIGSTOPped, a half-open connection) costs one
thread per dependency, however many probes arrive, and never a thread of the request pool that
every other endpoint needs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger("slimgpt.api.probes")

OK = "ok"


class Probe:
    def __init__(self, name: str, check: Callable[[], object], timeout: float) -> None:
        self.name = name
        self.check = check
        self.timeout = timeout
        self._lock = threading.Lock()
        self._inflight: Future[object] | None = None

    def _start(self) -> Future[object]:
        with self._lock:
            if self._inflight is None or self._inflight.done():
                future: Future[object] = Future()
                # A daemon thread: a check stuck on a hung dependency must not hold up the exit.
                threading.Thread(target=self._run, args=(future,), name=f"probe-{self.name}",
                                 daemon=True).start()
                self._inflight = future
            return self._inflight

    def _run(self, future: Future[object]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(self.check())
        except BaseException as err:  # noqa: BLE001 - handed to the waiters
            future.set_exception(err)

    async def run(self) -> str:
        """``ok`` or ``unreachable: <why>``, within ``timeout`` seconds."""
        future = asyncio.wrap_future(self._start())
        # Retrieved here so that a waiter that gave up leaves no "never retrieved" warning.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            result = await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except asyncio.TimeoutError:
            return f"unreachable: no answer within {self.timeout:g} s"
        except Exception as err:  # noqa: BLE001 - any failure of the check means "not ready"
            log.info("readiness check %s failed: %s", self.name, err)
            return f"unreachable: {type(err).__name__}"
        return OK if result is not False else "unreachable"
