"""Load with a fault: 1,000 submissions from 50 concurrent clients while Redis restarts (losing
every queued message) in the middle. Nothing is lost, nothing runs twice, every job ends."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from app.db.models import Job
from app.db.session import session_scope
from tests.stack import PrivateRedis, wait_until

from .conftest import completions, make_stack

pytestmark = pytest.mark.timeout(300)
JOBS, CLIENTS, WORKERS = 1000, 50, 3


def test_1000_jobs_from_50_clients_with_a_redis_restart_midway_none_lost_none_twice(
        pg_url: str, tmp_path: Path, redis_server: PrivateRedis) -> None:
    # Fast fake jobs: reuse pool processes (a fresh one per job costs seconds in Celery).
    stack = make_stack(pg_url, tmp_path, redis_server.url, worker_max_tasks_per_child=0,
                       job_lease_s=30)
    try:
        key = stack.api_key("load")
        url = stack.start_api("api")
        for i in range(WORKERS):
            stack.start_worker(f"w{i}", SLIMGPT_TEST_FAKE_LAYERS="1")
        for i in range(WORKERS):
            stack.wait_worker_ready(f"w{i}")

        accepted: list[str] = []
        latencies: list[float] = []
        lock = threading.Lock()
        restarted = threading.Event()

        def client(n: int) -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                              timeout=30) as http:
                for _ in range(JOBS // CLIENTS):
                    t = time.monotonic()
                    r = http.post("/v1/jobs", json={"model_id": "test/fake",
                                                    "target_ratio": 0.2})
                    assert r.status_code == 202, r.text
                    with lock:
                        accepted.append(r.json()["id"])
                        latencies.append(time.monotonic() - t)

        def restart_midway() -> None:
            wait_until(lambda: len(accepted) >= JOBS // 2, 120, "half the submissions")
            redis_server.restart()
            restarted.set()

        t0 = time.monotonic()
        restarter = threading.Thread(target=restart_midway, daemon=True)
        restarter.start()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
        submitted_s = time.monotonic() - t0
        restarter.join(30)
        assert restarted.is_set()

        def states() -> dict[str, int]:
            with session_scope(stack.settings) as s:
                return dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())

        wait_until(lambda: states().get("succeeded", 0) == JOBS, 240,
                   "every job to succeed", lambda: f"{states()}\n{stack.logs()}", interval=0.5)
        total_s = time.monotonic() - t0
        assert states() == {"succeeded": JOBS}
        assert len(set(accepted)) == JOBS  # 0 lost: every accepted job is there and succeeded
        ran = Counter(completions(stack))
        assert set(ran) == set(accepted)
        assert max(ran.values()) == 1  # 0 duplicated: no job ran to completion twice
        with session_scope(stack.settings) as s:
            resent = s.scalar(select(func.count()).where(Job.dispatch_count > 1))
        latencies.sort()
        print(f"\nFIGURE load jobs={JOBS} clients={CLIENTS} workers={WORKERS} "
              f"submitted_s={submitted_s:.1f} all_final_s={total_s:.1f} "
              f"post_p50_s={latencies[len(latencies) // 2]:.3f} "
              f"post_p99_s={latencies[int(len(latencies) * 0.99)]:.3f} "
              f"sent_more_than_once={resent} lost=0 duplicated=0")
    finally:
        stack.close()
