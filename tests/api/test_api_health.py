"""/healthz, /readyz, /metrics and the OpenAPI document."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.core.config import Settings


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_checks_database(client):
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["database"] == "ok"


def test_readyz_is_503_when_the_broker_is_unreachable(settings):
    from app.main import create_app

    prod = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    app = create_app(prod)
    with TestClient(app) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("unreachable")


def test_readyz_is_503_when_the_database_is_unreachable(settings, tmp_path):
    from app.main import create_app

    down = Settings(data_dir=tmp_path, secret_key=settings.secret_key,
                    database_url="postgresql+psycopg://postgres@127.0.0.1:1/nothing",
                    broker_url="redis://127.0.0.1:1/0", auto_migrate=False,
                    dispatcher_enabled=False)
    with TestClient(create_app(down)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["database"].startswith("unreachable")


def test_metrics_exposes_request_and_job_counters(client, submit):
    submit()
    text = client.get("/metrics").text
    assert "slimgpt_http_requests_total" in text
    assert 'route="/v1/jobs"' in text
    assert "slimgpt_jobs_submitted_total" in text
    assert 'slimgpt_jobs{state="queued"}' in text


def test_openapi_documents_every_route_with_examples(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
              "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/artifacts",
              "/v1/jobs/{job_id}/artifacts/{name}", "/v1/files", "/v1/hub-token",
              "/v1/estimate", "/healthz", "/readyz", "/metrics"):
        assert p in paths, p
    assert doc["components"]["schemas"]["JobCreate"]["examples"]


def test_production_settings_require_a_secret_key(tmp_path):
    import pytest

    from app.core.config import ConfigError
    from app.main import create_app

    with pytest.raises(ConfigError, match="SLIMGPT_SECRET_KEY"):
        create_app(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/15"))


def test_embedded_mode_generates_a_secret_key_once(tmp_path):
    s = Settings(data_dir=tmp_path)
    key = s.fernet_key()
    assert (tmp_path / "secret.key").read_bytes().strip() == key
    assert Settings(data_dir=tmp_path).fernet_key() == key


def test_without_the_worker_extra_the_server_is_not_ready_and_refuses_jobs(settings,
                                                                           monkeypatch):
    """An API-only install in embedded mode: the in-process worker cannot run jobs, so the
    server says so instead of accepting jobs that would all fail."""
    import sys

    from app.main import create_app

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    app = create_app(settings.model_copy(update={
        "embedded_worker": "worker.embedded:EmbeddedWorker", "auth_disabled": True}))
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert "`worker` extra" in r.json()["checks"]["worker"]
        r = c.post("/v1/jobs", json={"model_id": "a/b", "target_ratio": 0.2})
        assert r.status_code == 503 and "`worker` extra" in r.text
    assert app.state.embedded_worker is None  # never started: it would fail every job
