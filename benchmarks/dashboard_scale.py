"""How the dashboard and /metrics behave with a large job history, on a real Postgres.

Fills a private database with JOBS jobs of one tenant (each with a full event history: claim,
phases, one ``layer_done`` event per layer, final state), a dozen worker rows, then times what a
wall screen and a Prometheus server do repeatedly:

* ``/ui/jobs`` first page, a filtered page and the last page (offset paging);
* one job page;
* a tenant-stream poll that finds nothing new (what each open browser does every
  SLIMGPT_SSE_POLL_S);
* ``/metrics?scope=fleet``: the first scrape of a fresh replica (reads the whole history) and a
  steady scrape (reads only what changed).

    python benchmarks/dashboard_scale.py --jobs 5000 --layers 30

Prints one ``FIGURE name value`` line per measurement (milliseconds, median of the repeats).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def fill(url: str, jobs: int, layers: int, seed: int = 0) -> tuple[str, str, list[str]]:
    """Bulk-insert the history; returns (tenant id, API key, job ids)."""
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from app.crud.tenants import create_api_key
    from app.db.base import utcnow
    from app.db.models import Job, JobEvent, Worker
    from app.db.session import make_engine

    rng = random.Random(seed)
    engine = make_engine(url, null_pool=True)
    with Session(engine) as s:
        record, key = create_api_key(s, f"bench-{uuid.uuid4().hex[:6]}", name="bench")
        tenant_id = record.tenant_id
    start = utcnow() - timedelta(days=30)
    job_rows, event_rows, ids = [], [], []
    for i in range(jobs):
        job_id = str(uuid.uuid4())
        ids.append(job_id)
        created = start + timedelta(minutes=8 * i)
        started = created + timedelta(seconds=rng.uniform(1, 600))
        state = rng.choices(["succeeded", "failed", "cancelled"], [0.85, 0.1, 0.05])[0]
        finished = started + timedelta(seconds=rng.uniform(60, 3600))
        job_rows.append({
            "id": job_id, "tenant_id": tenant_id, "state": state, "cancel_requested": False,
            "model_id": f"org/model-{i % 37}", "model_source": "hub", "revision": "main",
            "request": {"model_id": f"org/model-{i % 37}", "target_ratio": 0.2},
            "phase": "publishing", "layer": layers - 1, "num_layers": layers, "percent": 100.0,
            "attempts": 1, "created_at": created, "started_at": started, "finished_at": finished,
            "updated_at": finished, "submitted_by": None,
            "error": "cholesky_failed: not positive definite" if state == "failed" else None,
            "metrics": {"seconds": {"loading": 12.0, "calibrating": 30.0, "pruning": 900.0},
                     "peak_gpu_memory_bytes": rng.randint(4, 80) * 1024**3}})
        history = ([("queued", None, None), ("loading", None, None), ("calibrating", None, None)]
                   + [("pruning", j, "layer_done") for j in range(layers)]
                   + [("verifying", None, None), ("publishing", None, None),
                      ("publishing", None, "final")])
        for seq, (phase, layer, kind) in enumerate(history, start=1):
            metrics = {"kind": kind, "heads_kept": 7.0, "channels_kept": 1200.0,
                       "attn_error": 0.01, "ffn_error": 0.1} if kind == "layer_done" else None
            event_rows.append({
                "job_id": job_id, "seq": seq, "time": started, "state": "running",
                "phase": phase, "layer": layer, "percent": 50.0, "message": f"{phase} {layer}",
                "metrics": metrics})
    with engine.begin() as conn:
        for chunk in range(0, len(job_rows), 2000):
            conn.execute(insert(Job), job_rows[chunk:chunk + 2000])
        for chunk in range(0, len(event_rows), 10000):
            conn.execute(insert(JobEvent), event_rows[chunk:chunk + 10000])
        conn.execute(insert(Worker), [{
            "id": f"gpu{i}@host{i // 4}", "kind": "celery", "host": f"host{i // 4}", "pid": 100 + i,
            "queue": "slimgpt", "gpu_name": "NVIDIA H200", "gpu_count": 1, "gpu_memory_bytes": 141 * 1024**3,
            "build": {"slimgpt_service": "0.1.0"}, "jobs_done": 0, "started_at": utcnow(),
            "last_heartbeat_at": utcnow()} for i in range(12)])
    engine.dispose()
    return tenant_id, key, ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--postgres", default=os.environ.get(
        "SLIMGPT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()

    from cryptography.fernet import Fernet
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.db.migrate import upgrade
    from app.db.session import session_scope
    from app.main import create_app
    from app.streams import EventCursor, latest_event_id, poll_events
    from tests.api.conftest import TempPostgres

    db = TempPostgres(args.postgres, prefix="slimgpt_bench")
    try:
        upgrade(db.url)
        t0 = time.perf_counter()
        tenant_id, key, ids = fill(db.url, args.jobs, args.layers)
        events = args.jobs * (args.layers + 6)
        print(f"filled {args.jobs} jobs and {events} events in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        settings = Settings(data_dir=Path(f"/tmp/slimgpt-bench-{uuid.uuid4().hex[:6]}"),
                            database_url=db.url, secret_key=Fernet.generate_key().decode(),
                            dispatcher_enabled=False, embedded_worker="", auto_migrate=False,
                            rate_limit_per_minute=0)
        app = create_app(settings)
        with TestClient(app, follow_redirects=False) as c:
            assert c.post("/ui/login", data={"api_key": key}).status_code == 303
            assert re.search(r"page 1 of \d+", c.get("/ui/jobs").text)
            pages = -(-args.jobs // 50)
            figures = {
                "ui_jobs_first_page_ms": lambda: c.get("/ui/jobs"),
                "ui_jobs_filtered_ms": lambda: c.get("/ui/jobs?state=failed&model=model-3"),
                "ui_jobs_last_page_ms": lambda: c.get(f"/ui/jobs?page={pages}"),
                "ui_job_page_ms": lambda: c.get(f"/ui/jobs/{ids[len(ids) // 2]}"),
                "ui_fleet_page_ms": lambda: c.get("/ui/fleet"),
            }
            for name, fn in figures.items():
                print(f"FIGURE {name} {_median_ms(fn, args.repeats):.1f}", flush=True)
            with session_scope(settings) as s:
                cursor = EventCursor(latest_event_id(s))

            def poll() -> None:
                with session_scope(settings) as s:
                    assert poll_events(s, tenant_id, cursor) == []

            print(f"FIGURE stream_idle_poll_ms {_median_ms(poll, args.repeats * 4):.2f}")
            t0 = time.perf_counter()
            first = c.get("/metrics?scope=fleet")
            print(f"FIGURE metrics_fleet_first_scrape_ms {(time.perf_counter() - t0) * 1000:.1f}")
            assert f"slimgpt_layers_pruned_total {float(args.jobs * args.layers)}" in first.text
            print(f"FIGURE metrics_fleet_steady_scrape_ms "
                  f"{_median_ms(lambda: c.get('/metrics?scope=fleet'), args.repeats):.1f}")
            print(f"FIGURE metrics_fleet_bytes {len(first.content)}")
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
