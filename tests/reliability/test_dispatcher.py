"""`slimgpt dispatcher` processes: one leader per database sends each job once; when the leader
dies another one takes over; SIGTERM stops one cleanly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.models import Job
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
