"""worker.lifecycle: SIGTERM during a job only asks it to stop; short database outages are
ridden out."""

from __future__ import annotations

import os
import signal

import pytest
from sqlalchemy.exc import OperationalError

from worker.lifecycle import STOP, process_prefix, retry_db, stop_on_sigterm


@pytest.fixture
def clean_stop_flag():
    # The flag is process-wide: left set (also when an assertion fails), it would make every
    # later in-process job of this pytest process that uses it hand itself back.
    yield
    STOP.clear()


def test_sigterm_during_a_job_sets_the_stop_flag_instead_of_exiting(clean_stop_flag) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm() as stop:
        assert stop is STOP and not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the job


def _flaky(failures: int):
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return "ok"

    return fn, calls


def test_a_short_database_outage_is_retried() -> None:
    fn, calls = _flaky(2)
    assert retry_db(fn, budget_s=5, what="testing") == "ok" and calls["n"] == 3


def test_a_long_database_outage_is_given_up_after_the_budget() -> None:
    fn, _ = _flaky(1000)
    with pytest.raises(OperationalError):
        retry_db(fn, budget_s=0.5, what="testing")


def test_a_lease_is_matched_to_its_process_by_prefix() -> None:
    assert "gpu-3:41:abcd".startswith(process_prefix(41, "gpu-3"))
    assert not "gpu-3:411:abcd".startswith(process_prefix(41, "gpu-3"))
