"""The API process dies right after committing a job, before anything was sent to the broker
(fault-injection point ``SLIMGPT_TEST_CRASH_AT=after_commit``): the job is not lost."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.db.models import Job
from app.db.session import session_scope
from tests.stack import PrivateRedis

from .conftest import Api, completions, make_stack

pytestmark = pytest.mark.timeout(180)


def test_a_job_committed_by_an_api_that_died_before_publishing_still_runs(
        pg_url: str, tmp_path: Path, redis_server: PrivateRedis) -> None:
    stack = make_stack(pg_url, tmp_path, redis_server.url)
    try:
        key = stack.api_key()
        url = stack.start_api("doomed-api", SLIMGPT_TEST_CRASH_AT="after_commit")
        with pytest.raises(httpx.HTTPError):  # the process exits mid-request
            httpx.post(f"{url}/v1/jobs", json={"model_id": "test/fake", "target_ratio": 0.2},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert stack.procs["doomed-api"].wait(timeout=10) == 70
        with session_scope(stack.settings) as s:
            job = s.scalars(select(Job)).one()  # committed, never sent
            job_id, sent = job.id, job.dispatch_count
        assert sent == 0 and job.state == "queued"
        assert redis_server.client().llen(stack.queue_key()) == 0

        stack.start_worker("w1", SLIMGPT_TEST_FAKE_LAYERS="2")
        stack.wait_worker_ready("w1")
        t0 = time.monotonic()
        api = Api(stack.start_api("api"), key)  # a restarted (or another) API replica
        done = api.wait_final([job_id], 60, stack)[job_id]
        assert done["state"] == "succeeded", (done["error"], stack.logs())
        assert completions(stack, at_least=1) == [job_id]
        print(f"\nFIGURE api_killed_after_commit lost=0 duplicated=0 "
              f"final_after_api_restart_s={time.monotonic() - t0:.2f}")
        api.close()
    finally:
        stack.close()
