"""Dispatcher leadership with real processes: one leader per database sends each job once; when
the leader dies or is frozen another one takes over; SIGTERM stops one cleanly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.models import DispatcherLease, Job
from app.db.session import session_scope
from tests.stack import PrivateRedis, wait_until

from .conftest import Api, make_stack

pytestmark = pytest.mark.timeout(120)
LEADER_LINE = "this process is now the dispatcher leader"


def test_two_dispatchers_elect_one_leader_which_sends_each_job_once_and_a_survivor_takes_over(
        pg_url: str, tmp_path: Path, redis_server: PrivateRedis) -> None:
    stack = make_stack(pg_url, tmp_path, redis_server.url, dispatcher_enabled=False)
    redis = redis_server.client()

    def queued() -> list[str]:
        return [json.loads(raw)["headers"]["id"]
                for raw in redis.lrange(stack.queue_key(), 0, -1)]

    try:
        api = Api(stack.start_api("api"), stack.api_key())  # its own dispatcher is off
        for name in ("d1", "d2"):
            stack.start(name, ["-m", "app.cli", "dispatcher"])
        leader = wait_until(lambda: next((n for n in ("d1", "d2")
                                          if LEADER_LINE in stack.log(n)), None),
                            30, "a leader", stack.logs)
        other = "d2" if leader == "d1" else "d1"
        first = [api.submit() for _ in range(20)]
        wait_until(lambda: set(first) <= set(queued()), 20, "the jobs to be sent", stack.logs)
        time.sleep(1.0)  # a second sender would show up by now
        assert sorted(queued()) == sorted(first)  # each sent once, by one process
        assert LEADER_LINE not in stack.log(other)

        stack.kill9(leader)  # its connection closes, Postgres releases the lock
        killed_at = time.monotonic()
        later = [api.submit() for _ in range(5)]
        wait_until(lambda: set(later) <= set(queued()), 30, "the survivor to send", stack.logs)
        took_over = time.monotonic() - killed_at
        assert LEADER_LINE in stack.log(other)

        def counts() -> dict[str, int]:
            with session_scope(stack.settings) as s:
                return dict(s.execute(select(Job.id, Job.dispatch_count)).all())

        # Marked right after sending; once marked, each was sent exactly once.
        wait_until(lambda: all(counts()[j] >= 1 for j in later), 10, "the marks")
        assert all(counts()[j] == 1 for j in first + later)

        stack.term(other)
        assert stack.procs[other].wait(timeout=20) == 0
        print(f"\nFIGURE dispatcher_failover sent_once=25 took_over_after_s={took_over:.2f} "
              f"sweep_s={stack.settings.sweep_interval_s}")
        api.close()
    finally:
        stack.close()


def test_a_frozen_leader_is_replaced_within_its_lease_and_stands_down_when_it_resumes(
        pg_url: str, tmp_path: Path, redis_server: PrivateRedis) -> None:
    """Two API replicas, each with its dispatcher; the leader is SIGSTOPped (a long GC or VM
    pause: its connections stay open). A job submitted meanwhile to the other replica is sent
    and runs within the leader lease; after SIGCONT the old leader stands down without sending
    anything, and there is still one leader."""
    lease_s = 3.0
    stack = make_stack(pg_url, tmp_path, redis_server.url, leader_lease_s=lease_s,
                       worker_max_tasks_per_child=0)

    def lease() -> tuple[str, int]:
        with session_scope(stack.settings) as s:
            row = s.get(DispatcherLease, "dispatcher")
            assert row is not None and row.holder is not None
            return row.holder, row.term

    def dispatch_counts(ids: list[str]) -> dict[str, int]:
        with session_scope(stack.settings) as s:  # the module's database has other tests' jobs
            return dict(s.execute(select(Job.id, Job.dispatch_count)
                                  .where(Job.id.in_(ids))).all())

    try:
        stack.start_worker("w1", SLIMGPT_TEST_FAKE_LAYERS="2")
        key = stack.api_key()
        api1 = Api(stack.start_api("api1"), key)
        wait_until(lambda: LEADER_LINE in stack.log("api1"), 30, "api1 to lead", stack.logs)
        api2 = Api(stack.start_api("api2"), key)
        stack.wait_worker_ready("w1")
        warm = api2.submit()  # the healthy path, and a warm worker
        assert api2.wait_final([warm], 30, stack)[warm]["state"] == "succeeded"
        old_holder, old_term = lease()
        assert f":{stack.procs['api1'].pid}:" in old_holder
        assert LEADER_LINE not in stack.log("api2")

        stack.freeze("api1")
        frozen_at = time.monotonic()
        job = api2.submit()
        done = api2.wait_final([job], 30, stack)[job]
        recovered_s = time.monotonic() - frozen_at
        assert done["state"] == "succeeded", done["error"]
        holder, term = lease()
        assert f":{stack.procs['api2'].pid}:" in holder and term == old_term + 1
        # Taken over only once the lease ran out (the frozen leader's session is still open),
        # and within lease + one candidate retry (lease/3), plus the loaded machine's slack.
        assert lease_s * 2 / 3 < recovered_s < lease_s * 4 / 3 + 5, recovered_s

        stack.thaw("api1")
        wait_until(lambda: "standing down" in stack.log("api1"), 10,
                   "the resumed leader to notice", stack.logs)
        later = [api1.submit() for _ in range(3)] + [api2.submit() for _ in range(3)]
        api1.wait_final(later, 30, stack)
        time.sleep(lease_s / 3 + 0.5)  # a renewal period: a second leader would show by now
        assert lease() == (holder, term)
        assert stack.log("api1").count(LEADER_LINE) == 1  # never again after resuming
        counts = dispatch_counts([warm, job, *later])
        assert list(counts.values()) == [1] * 8, counts
        print(f"\nFIGURE frozen_leader lease_s={lease_s} job_done_after_freeze_s="
              f"{recovered_s:.2f} sent_once={len(later) + 2}")
        api1.close()
        api2.close()
    finally:
        stack.close()
