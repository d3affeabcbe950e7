"""Redis restarted (losing every message) or hung (SIGSTOP): no job is lost or run twice,
submissions neither fail nor wait, and a running job is not interrupted."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.stack import PrivateRedis, Stack, wait_until

from .conftest import Api, completions, make_stack

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def stack(pg_url: str, tmp_path: Path, redis_server: PrivateRedis) -> Iterator[Stack]:
    # Many short fake jobs: reuse pool processes (Celery takes up to 5 s to replace one).
    s = make_stack(pg_url, tmp_path, redis_server.url, worker_max_tasks_per_child=0)
    try:
        yield s
    finally:
        s.close()


def _queued_ids(client, key: str) -> set[str]:
    return {json.loads(raw)["headers"]["id"] for raw in client.lrange(key, 0, -1)}


def test_a_redis_restart_loses_the_queue_but_every_job_still_runs_once(
        stack: Stack, redis_server: PrivateRedis) -> None:
    api = Api(stack.start_api("api"), stack.api_key())
    stack.start_worker("w1", SLIMGPT_TEST_FAKE_LAYERS="3", SLIMGPT_TEST_LAYER_DELAY_S="0.25")
    stack.wait_worker_ready("w1")
    ids = [api.submit() for _ in range(10)]
    first = ids[0]
    wait_until(lambda: api.job(first)["progress"]["layer"] is not None, 30,
               "the first job to be running", stack.logs)
    redis = redis_server.client()
    assert len(_queued_ids(redis, stack.queue_key())) >= 5  # the others wait in Redis

    redis_server.restart()  # no persistence: every queued message is gone
    t0 = time.monotonic()
    wait_until(lambda: _queued_ids(redis, stack.queue_key()), 20,
               "the dispatcher to send the queued jobs again", stack.logs, interval=0.05)
    resent_after = time.monotonic() - t0

    jobs = api.wait_final(ids, 90, stack)
    assert {j["state"] for j in jobs.values()} == {"succeeded"}, stack.logs()
    assert sorted(completions(stack, at_least=len(ids))) == sorted(ids)  # each ran to completion exactly once
    # The job that was running when Redis went away was not interrupted.
    assert jobs[first]["attempts"] == 1
    print(f"\nFIGURE redis_restart queued=9 resent_after_s={resent_after:.2f} "
          f"all_final_after_s={time.monotonic() - t0:.2f} lost=0 duplicated=0")
    api.close()


def test_a_hung_redis_neither_fails_nor_slows_submissions_and_healthz_answers(
        stack: Stack, redis_server: PrivateRedis) -> None:
    url = stack.start_api("api")
    api = Api(url, stack.api_key())
    redis = redis_server.client()
    latencies = []
    for _ in range(5):  # the normal case: sent as soon as it is committed
        job_id = api.submit()
        t = time.monotonic()  # from the 202 on
        wait_until(lambda j=job_id: j in _queued_ids(redis, stack.queue_key()), 10, "publishing",
                   stack.logs, interval=0.005)
        latencies.append(time.monotonic() - t)
    redis_server.pause()
    try:
        def post(_: int) -> tuple[int, float, str]:
            t = time.monotonic()
            r = api.http.post("/v1/jobs", json={"model_id": "test/fake", "target_ratio": 0.2})
            return r.status_code, time.monotonic() - t, r.json().get("id", "")

        def health(_: int) -> float:
            t = time.monotonic()
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
            return time.monotonic() - t

        with ThreadPoolExecutor(64) as pool:
            posts = pool.map(post, range(60))
            checks = pool.map(health, range(4))
            results, health_s = list(posts), list(checks)
    finally:
        redis_server.resume()
    codes = {code for code, _, _ in results}
    slowest = max(s for _, s, _ in results)
    assert codes == {202}
    assert slowest < 2.0, slowest
    assert max(health_s) < 2.0, health_s
    ids = {job_id for _, _, job_id in results}
    t0 = time.monotonic()
    wait_until(lambda: ids <= _queued_ids(redis, stack.queue_key()), 30,
               "every job to be sent once Redis answers again", stack.logs)
    print(f"\nFIGURE publish_latency after_202_to_redis_max_s={max(latencies):.3f}")
    print(f"\nFIGURE redis_sigstop posts=60 max_post_s={slowest:.2f} "
          f"max_healthz_s={max(health_s):.2f} sent_after_resume_s={time.monotonic() - t0:.2f}")
    api.close()
