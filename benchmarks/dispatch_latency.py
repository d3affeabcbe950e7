"""How long a committed job waits before the dispatcher sends it (the normal case).

    python benchmarks/dispatch_latency.py [--jobs 50] [--postgres URL]

On a fresh database of the given PostgreSQL server (default ``SLIMGPT_TEST_POSTGRES_URL``), a
running :class:`app.dispatcher.Dispatcher` with a 30 s sweep interval is woken only by the
``NOTIFY`` of each job's transaction (its in-process wake-up is disconnected, as for a leader in
another process). Prints the commit-to-publish latency percentiles; the broker is a recorder,
so the figure is the dispatcher's own delay, not Redis's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from cryptography.fernet import Fernet

from app.core.config import Settings
from app.crud.tenants import create_api_key
from app.db import notify
from app.db.base import utcnow
from app.db.migrate import upgrade
from app.db.models import Job
from app.db.session import get_session_factory
from app.dispatcher import Dispatcher


class RecordingPublisher:
    def __init__(self) -> None:
        self.sent: dict[str, float] = {}

    def publish(self, job_id: str, queue: str) -> None:
        self.sent[job_id] = time.monotonic()

    def broker_lost_messages(self) -> bool:
        return False

    def ping(self) -> bool:
        return True

    def reset(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--postgres", default=os.environ.get(
        "SLIMGPT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    args = ap.parse_args()

    from tests.api.conftest import TempPostgres

    db = TempPostgres(args.postgres, prefix="slimgpt_bench")
    try:
        upgrade(db.url)
        settings = Settings(database_url=db.url, broker_url="redis://recorder.invalid/0",
                            secret_key=Fernet.generate_key().decode(), sweep_interval_s=30)
        factory = get_session_factory(settings)
        with factory() as s:
            tenant_id = create_api_key(s, "bench")[0].tenant_id
        publisher = RecordingPublisher()
        dispatcher = Dispatcher(settings, factory, publisher=publisher)
        notify.unsubscribe(dispatcher._wake)  # only NOTIFY may wake it
        dispatcher.start()
        time.sleep(1.0)
        latencies = []
        for _ in range(args.jobs):
            with factory() as s:
                job = Job(tenant_id=tenant_id, model_id="a/b", request={},
                          next_dispatch_at=utcnow())
                s.add(job)
                s.flush()
                job_id = job.id
                notify.job_ready(s)
                s.commit()
            committed = time.monotonic()
            while job_id not in publisher.sent:
                time.sleep(0.0005)
            latencies.append((publisher.sent[job_id] - committed) * 1000)
            time.sleep(0.05)
        dispatcher.stop()
        latencies.sort()
        print(f"commit -> publish over {args.jobs} jobs (ms): "
              f"p50 {statistics.median(latencies):.1f}  "
              f"p90 {latencies[int(0.9 * len(latencies))]:.1f}  max {latencies[-1]:.1f}")
    finally:
        db.close()


if __name__ == "__main__":
    main()
