"""SLIMGPT_LOG_JSON=1: one JSON object per line, and every line logged while a job runs carries
its job id (API, crud and worker loggers alike, even without `extra=`)."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator

import pytest

from app.core.config import Settings
from app.core.logging import (
    SERVICE_LOGGERS,
    configure_logging,
    current_job_id,
    job_context,
    uvicorn_log_config,
)


@pytest.fixture
def json_logs(monkeypatch) -> Iterator[io.StringIO]:
    monkeypatch.setenv("SLIMGPT_LOG_JSON", "1")
    settings = Settings(_env_file=None)
    assert settings.log_json is True
    names = (*SERVICE_LOGGERS, "")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers))
             for n in names}
    configure_logging(settings.log_json, "INFO")
    buf = io.StringIO()
    handler = logging.getLogger().handlers[-1]  # one handler, on the root: every logger
    assert getattr(handler, "_slimgpt", False)
    handler.setStream(buf)  # instead of stderr
    try:
        yield buf
    finally:
        for name, (level, handlers) in saved.items():
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.handlers[:] = handlers


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_every_line_inside_a_job_carries_its_id(json_logs):
    with job_context("job-1"):
        assert current_job_id() == "job-1"
        logging.getLogger("slimgpt.jobs").info("claimed")
        logging.getLogger("worker.model_source").warning("resolved %s", "a/b")
        logging.getLogger("slimgpt.api").info("explicit", extra={"job_id": "job-2"})
    logging.getLogger("slimgpt.api").info("not a job line")
    lines = _lines(json_logs)
    assert [(ln["logger"], ln["message"], ln.get("job_id")) for ln in lines] == [
        ("slimgpt.jobs", "claimed", "job-1"),
        ("worker.model_source", "resolved a/b", "job-1"),
        ("slimgpt.api", "explicit", "job-2"),
        ("slimgpt.api", "not a job line", None),
    ]
    assert all({"time", "level", "logger", "message"} <= set(ln) for ln in lines)
    assert current_job_id() is None


def test_library_and_uvicorn_lines_are_json_too_and_secrets_are_scrubbed(json_logs):
    logging.config.dictConfig(uvicorn_log_config())
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("some.library").warning("calling with Authorization: Bearer %s",
                                              "sgk_abc_secretsecret")
    lines = _lines(json_logs)
    assert [(ln["logger"], ln["level"]) for ln in lines] == [("uvicorn.error", "INFO"),
                                                             ("some.library", "WARNING")]
    assert lines[0]["message"] == "Started server process [42]"
    assert "secretsecret" not in lines[1]["message"] and "[REDACTED]" in lines[1]["message"]


def test_lines_logged_during_a_request_carry_its_request_id(json_logs, tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = Settings(_env_file=None, data_dir=tmp_path, auth_disabled=True,
                        embedded_worker="")
    with TestClient(create_app(settings)) as c:
        r = c.get("/v1/jobs", headers={"X-Request-ID": "req-123"})
        assert r.headers["X-Request-ID"] == "req-123"
        generated = c.get("/healthz").headers["X-Request-ID"]
    access = [ln for ln in _lines(json_logs) if ln["logger"] == "slimgpt.access"]
    assert [(ln["request_id"], ln["status"]) for ln in access] == [("req-123", 200),
                                                                  (generated, 200)]
    assert access[0]["path"] == "/v1/jobs" and access[0]["method"] == "GET"


def test_the_embedded_worker_tags_the_runner_lines(json_logs, tmp_path):
    from app.crud.tenants import create_api_key
    from app.db import session as db_session
    from app.db.migrate import upgrade
    from app.db.models import Job
    from worker.embedded import EmbeddedWorker

    settings = Settings(_env_file=None, data_dir=tmp_path)
    upgrade(str(settings.database_url))
    factory = db_session.get_session_factory(settings)
    with factory() as s:
        record, _ = create_api_key(s, "logs")
        job = Job(tenant_id=record.tenant_id, model_id="a/b", request={}, state="queued")
        s.add(job)
        s.commit()
        job_id = job.id

    def runner(job_id: str) -> None:
        logging.getLogger("worker.runner").info("pruning layer 1 with token hf_abcdefghijklmn")
        with factory() as s:
            s.get(Job, job_id).state = "cancelled"
            s.commit()

    w = EmbeddedWorker(settings, runner)
    w.start()
    assert w.wait_idle(10)
    w.stop()
    db_session.dispose_engines(str(settings.database_url))
    lines = [ln for ln in _lines(json_logs) if ln["logger"] == "worker.runner"]
    assert len(lines) == 1
    assert lines[0]["job_id"] == job_id
    assert "hf_abcdefghijklmn" not in lines[0]["message"]  # secrets scrubbed as well


def test_the_celery_task_tags_the_runner_lines(json_logs):
    pytest.importorskip("celery")
    from celery import Celery

    from worker.tasks import RUNNER_CONF_KEY, register_tasks

    app = Celery("t", set_as_current=False)
    app.conf.update({RUNNER_CONF_KEY: f"{__name__}:_runner_for_celery",
                     "task_always_eager": True})
    task = register_tasks(app)
    task.apply(args=["0d9e6c1e-1111-2222-3333-444455556666"])
    lines = [ln for ln in _lines(json_logs) if ln["logger"] == "worker.runner"]
    assert [ln.get("job_id") for ln in lines] == ["0d9e6c1e-1111-2222-3333-444455556666"]


def _runner_for_celery(job_id: str) -> None:
    logging.getLogger("worker.runner").info("ran")
