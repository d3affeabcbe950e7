"""Test-only fault injection: ``SLIMGPT_TEST_CRASH_AT=<point>`` makes the process exit at once
(``os._exit``, no cleanup, as a SIGKILL there would) when it reaches that point. It is not a
setting; production never sets it. Points: ``after_commit`` (POST /v1/jobs, right after the
job's transaction committed, before the response and before any wake-up in this process)."""

from __future__ import annotations

import os

CRASH_ENV = "SLIMGPT_TEST_CRASH_AT"
EXIT_CODE = 70


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(EXIT_CODE)
