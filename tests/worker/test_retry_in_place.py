"""A transient error retried inside one worker process is an attempt of that worker, recorded
once; it is not a lease takeover (no second "claimed by" event or log line)."""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.fernet import Fernet

from app.core.config import Settings
from app.crud import jobs as crud
from app.db.migrate import upgrade
from app.db.models import Job, JobEvent
from app.db.session import session_scope
from worker.errors import HubUnavailableError
from worker.runner import JobRunner, as_worker_settings


def _settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    return Settings(data_dir=tmp_path, database_url=url, hub_backoff_base_s=0,
                    secret_key=Fernet.generate_key().decode(), auto_migrate=False)


def _queued_job(settings: Settings) -> str:
    from app.crud.tenants import get_or_create_tenant

    with session_scope(settings) as s:
        tenant = get_or_create_tenant(s, "t")
        job = Job(tenant_id=tenant.id, state="queued", model_id="a/b", model_source="hub",
                  revision="main", request={"target_ratio": 0.2}, phase="queued", percent=0.0)
        s.add(job)
        s.commit()
        return job.id


def test_an_in_place_retry_is_one_attempt_of_the_same_worker(tmp_path, monkeypatch, caplog):
    settings = _settings(tmp_path)
    job_id = _queued_job(settings)
    runner = JobRunner(as_worker_settings(settings), worker_id="host:1:aaaa")
    calls = []

    def pipeline(job_id: str, token, ctl, state) -> None:
        calls.append(job_id)
        if len(calls) == 1:
            raise HubUnavailableError("the Hub is unavailable (HTTP 503) for a/b")
        with session_scope(settings) as s:
            crud.finish_job(s, job_id, "succeeded", worker_id=runner.worker_id)

    monkeypatch.setattr(runner, "_pipeline", pipeline)
    with caplog.at_level(logging.INFO):
        runner.run(job_id)

    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        messages = [e.message for e in s.query(JobEvent).filter(JobEvent.job_id == job_id)
                    .order_by(JobEvent.seq)]
    assert job.state == "succeeded" and job.attempts == 2 and len(calls) == 2
    assert sum("claimed by" in m for m in messages) == 1
    retries = [m for m in messages if m.startswith("retrying after a transient error")]
    assert retries == [("retrying after a transient error (hub_unavailable): the Hub is "
                        "unavailable (HTTP 503) for a/b (attempt 2)")]
    log_lines = [r.getMessage() for r in caplog.records]
    assert sum("claimed by" in line for line in log_lines) == 1
    assert any("retried in place" in line for line in log_lines)


def test_an_in_place_retry_needs_the_lease(tmp_path):
    settings = _settings(tmp_path)
    job_id = _queued_job(settings)
    with session_scope(settings) as s:
        assert crud.claim_job(s, job_id, "w1", 60) is not None
        assert crud.retry_in_place(s, job_id, "w2", 60, "retrying") is None  # not w2's lease
        assert crud.retry_in_place(s, job_id, "w1", 60, "retrying").attempts == 2
