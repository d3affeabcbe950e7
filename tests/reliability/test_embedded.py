"""Embedded mode (SQLite, no broker): the in-process worker uses the same lease, so stopping the
service hands the running job back and the next start resumes it from its checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.core.config import Settings
from app.crud.tenants import create_api_key
from app.db import session as db_session
from app.db.migrate import upgrade
from app.db.models import Job
from tests.stack import wait_until
from worker.embedded import EmbeddedWorker

from . import fake_runner
from .fake_runner import expected_digest

pytestmark = pytest.mark.timeout(60)


def test_stopping_the_embedded_worker_hands_the_job_back_and_a_restart_resumes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fake_runner.LAYERS_ENV, "4")
    monkeypatch.setenv(fake_runner.DELAY_ENV, "0.3")
    settings = Settings(_env_file=None, data_dir=tmp_path, job_lease_s=30)
    upgrade(str(settings.database_url))
    factory = db_session.get_session_factory(settings)
    with factory() as s:
        record, _ = create_api_key(s, "embedded")
        job = Job(tenant_id=record.tenant_id, model_id="test/fake", request={})
        s.add(job)
        s.commit()
        job_id = job.id

    def layers_done() -> int:
        with factory() as s:
            n = len([e for e in s.get(Job, job_id).events
                     if (e.metrics or {}).get("kind") == "layer_done"])
            s.rollback()
            return n

    try:
        first = EmbeddedWorker(settings)
        first.runner = lambda j: fake_runner.run_job(j, settings, stop_event=first.stop_event)
        first.start()
        wait_until(lambda: layers_done() >= 1, 20, "the first layer")
        t0 = time.monotonic()
        first.stop(timeout=10)  # the service shuts down
        assert time.monotonic() - t0 < 2.0  # the rest of one layer, not the whole job
        with factory() as s:
            row = s.get(Job, job_id)
            assert row.state == "queued" and row.lost_count == 0
            s.rollback()
        done = layers_done()
        assert 1 <= done < 4

        second = EmbeddedWorker(settings)
        second.runner = lambda j: fake_runner.run_job(j, settings, stop_event=second.stop_event)
        second.start()
        try:
            assert second.wait_idle(20)
        finally:
            second.stop()
        with factory() as s:
            row = s.get(Job, job_id)
            assert row.state == "succeeded", row.error
            assert row.result["digest"] == expected_digest(job_id, 4)
            assert row.metrics["resumed_from"] == done and row.attempts == 2
    finally:
        db_session.dispose_engines(str(settings.database_url))
