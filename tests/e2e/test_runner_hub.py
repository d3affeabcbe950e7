"""The runner's Hub path (fake model source and fake Hub publisher) and token hygiene.

One job runs in-process with a tenant Hub token; the API sends its message to the real Redis
(under a private prefix, with no worker consuming it) so the raw broker message can be read.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.db.migrate import upgrade
from worker.model_source import ResolvedModel
from worker.publish import HubDestination, PublishResult, publishable_files
from worker.runner import run_job

from .conftest import REDIS_URL, job_body, upload_calibration, wait_until

pytestmark = pytest.mark.timeout(240)
SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeModelSource:
    """Resolves any Hub id to the tiny local folder, like a download would, and is chatty."""

    folder: Path
    calls: list[dict[str, Any]] = field(default_factory=list)

    def resolve(self, ref: str, *, revision: str | None = None,
                token: str | None = None) -> ResolvedModel:
        self.calls.append({"ref": ref, "revision": revision, "token": token})
        # A careless library logging the token: the runner's redaction must scrub it.
        logging.getLogger("fake.hub").warning("GET %s with Authorization: Bearer %s", ref, token)
        return ResolvedModel(path=self.folder, kind="hub", model_type="llama", repo_id=ref,
                             revision=SHA)


@dataclass
class FakeHubPublisher:
    token: str
    calls: list[dict[str, Any]] = field(default_factory=list)

    def publish(self, folder: Path, *, job_id: str,
                destination: HubDestination | None) -> PublishResult:
        assert destination is not None
        self.calls.append({"folder": folder, "job_id": job_id, "destination": destination,
                           "files": [p.as_posix() for p in publishable_files(folder)]})
        base = f"https://hub.test/{destination.repo_id}"
        return PublishResult(location=f"{base}/discussions/1", url=f"{base}/commit/{'c' * 40}",
                             commit_sha="c" * 40, pr_url=f"{base}/discussions/1")


@pytest.fixture(scope="module")
def hub_job(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("hub")
    tag = uuid.uuid4().hex[:12]
    settings = Settings(
        data_dir=tmp, database_url=f"sqlite:///{tmp / 'db.sqlite'}", broker_url=REDIS_URL,
        broker_key_prefix=f"slimgpt-e2e-{tag}:", celery_queue=f"hub-{tag}",
        local_models_dir=tiny_models, cache_dir=tmp / "cache",
        secret_key=Fernet.generate_key().decode(),
    )
    upgrade(str(settings.database_url))
    token = f"tenant-secret-{uuid.uuid4().hex}"  # not hf_-shaped: only registration hides it
    from app.crud.tenants import create_api_key
    from app.db.session import session_scope
    from app.main import create_app

    with session_scope(settings) as s:
        _, key = create_api_key(s, "hub")
    headers = {"Authorization": f"Bearer {key}"}
    broker = redis.Redis.from_url(REDIS_URL)
    source = FakeModelSource(tiny_models / "tiny4")
    publishers: list[FakeHubPublisher] = []

    def factory(tok: str) -> FakeHubPublisher:
        publishers.append(FakeHubPublisher(tok))
        return publishers[-1]

    try:
        with TestClient(create_app(settings)) as client:
            assert client.put("/v1/hub-token", json={"token": token},
                              headers=headers).status_code in (200, 204)
            file_id = upload_calibration(client, headers)
            body = job_body("acme/tiny-base", file_id, destination={
                "hub_repo_id": "acme/tiny-slim", "private": True, "create_pr": True})
            r = client.post("/v1/jobs", json=body, headers=headers)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            queue = f"{settings.broker_key_prefix}{settings.celery_queue}"
            # The dispatcher sends the committed job (no worker consumes this queue).
            raw = wait_until(lambda: broker.lrange(queue, 0, -1), 10, "the broker message")

            handler = _Capture()
            logging.getLogger().addHandler(handler)
            old_level = logging.getLogger().level
            logging.getLogger().setLevel(logging.DEBUG)
            try:
                # Its own stop flag: by default an in-process job shares the process-wide
                # SIGTERM flag (worker.lifecycle.STOP), which any earlier test of this pytest
                # process may have left set; the job would then hand itself back at once.
                run_job(job_id, settings, model_source=source, hub_publisher_factory=factory,
                        stop_event=threading.Event())
            finally:
                logging.getLogger().removeHandler(handler)
                logging.getLogger().setLevel(old_level)
            job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
            events = client.get(f"/v1/jobs/{job_id}/events",
                                headers={**headers, "accept": "application/json"}).json()
            yield {"token": token, "job": job, "events": events, "raw": raw, "logs": handler.text,
                   "source": source, "publishers": publishers, "settings": settings}
    finally:
        for k in broker.scan_iter(match=f"{settings.broker_key_prefix}*"):
            broker.delete(k)
        broker.close()


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def test_runner_hub_path_publishes_with_the_tenant_token_and_records_url_and_commit(
        hub_job: dict) -> None:
    job = hub_job["job"]
    assert job["state"] == "succeeded", job["error"]
    assert job["model_commit_sha"] == SHA  # the revision the source pinned
    assert hub_job["source"].calls == [
        {"ref": "acme/tiny-base", "revision": "main", "token": hub_job["token"]}]
    (pub,) = hub_job["publishers"]
    assert pub.token == hub_job["token"]
    (call,) = pub.calls
    assert call["destination"] == HubDestination("acme/tiny-slim", private=True, create_pr=True)
    assert call["job_id"] == job["id"]
    assert call["files"][-1] == "README.md" and "config.json" in call["files"]
    assert call["folder"] == Path(hub_job["settings"].artifacts_dir) / job["id"] / "model"
    result = job["result"]
    assert result["hub_repo_id"] == "acme/tiny-slim"
    assert result["hub_commit_sha"] == "c" * 40
    assert result["hub_url"].endswith("/discussions/1")
    assert result["hub_commit_url"].endswith("/commit/" + "c" * 40)
    assert result["location"].startswith("file://")  # local artifacts too


def test_runner_hub_token_never_in_logs_events_job_or_broker_message(hub_job: dict) -> None:
    token = hub_job["token"]
    assert hub_job["job"]["state"] == "succeeded"
    assert hub_job["raw"], "the API sent no broker message"
    assert all(token.encode() not in m for m in hub_job["raw"])
    assert any(hub_job["job"]["id"].encode() in m for m in hub_job["raw"])
    logs = hub_job["logs"]
    assert "[REDACTED]" in logs  # the chatty fake source did try to log it
    assert token not in logs
    import json

    assert token not in json.dumps(hub_job["events"])
    assert token not in json.dumps(hub_job["job"])
