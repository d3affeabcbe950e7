"""Liveness of a worker, for container health checks: ``python -m worker.liveness``.

The worker's main process refreshes a heartbeat file every few seconds from a timer of Celery's
own event loop, so the file goes stale when that process dies or its loop is stuck; a job runs
in a child process, so a layer that takes an hour does not. The check passes while the file is
younger than ``--max-age`` seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

from celery import bootsteps

HEARTBEAT_INTERVAL_S = 10.0
DEFAULT_MAX_AGE_S = 60.0


def default_heartbeat_path() -> Path:
    # One worker per container: a fixed name that the health check finds without configuration.
    return Path(tempfile.gettempdir()) / "slimgpt-worker.heartbeat"


def beat(path: Path) -> None:
    path.touch()  # sets the modification time to now, creating the file the first time


class LivenessFile(bootsteps.StartStopStep):
    """Worker bootstep: refreshes the heartbeat file on the worker's timer."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Timer"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.path = default_heartbeat_path()
        self._tref: Any = None

    def start(self, parent: Any) -> None:
        beat(self.path)
        self._tref = parent.timer.call_repeatedly(HEARTBEAT_INTERVAL_S, beat, (self.path,))

    def stop(self, parent: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        self.path.unlink(missing_ok=True)


def heartbeat_age_s(path: Path, now: float | None = None) -> float | None:
    """Seconds since the last beat, or None when there is no heartbeat file."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - mtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.liveness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, default=default_heartbeat_path())
    parser.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_S,
                        help="seconds without a beat before the worker counts as dead")
    args = parser.parse_args(argv)
    age = heartbeat_age_s(args.file)
    if age is None:
        print(f"no heartbeat at {args.file}: the worker has not started", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"last heartbeat {age:.0f} s ago (limit {args.max_age:.0f} s)", file=sys.stderr)
        return 1
    print(f"alive: last heartbeat {age:.1f} s ago")
    return 0


if __name__ == "__main__":
    sys.exit(main())
