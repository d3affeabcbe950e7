"""A live API on 127.0.0.1 (uvicorn in a thread, SQLite in a tmp dir) whose jobs are driven by a
fake runner, so the client and the CLI are tested over real HTTP, SSE included.

Fake models (the runner picks its behaviour from ``model_id``):
  ``test/ok``   three "layers" of progress events, artifacts written, succeeded with metrics
  ``test/fail`` fails with an error
  ``test/slow`` runs until a cancel is requested, then ends cancelled
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from app.core.config import Settings
from app.crud import jobs as crud
from app.db import notify
from app.db import session as db_session
from app.db.migrate import upgrade
from app.db.models import Job

ARTIFACTS = {
    "config.json": b'{"model_type": "llama", "num_hidden_layers": 3}',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
}


def fake_runner(settings: Settings) -> Callable[[str], None]:
    factory = db_session.get_session_factory(settings)

    def run(job_id: str) -> None:
        with factory() as s:
            job = crud.claim_job(s, job_id, "fake", 60)
            if job is None:
                return
            model = job.model_id
            if model == "test/fail":
                crud.add_event(s, job_id, phase="loading", message="loading the model",
                               percent=1.0)
                crud.finish_job(s, job_id, "failed", error="fake failure: out of memory")
                return
            if model == "test/slow":
                crud.add_event(s, job_id, phase="pruning", message="layer 1/100", layer=0,
                               num_layers=100, percent=1.0)
                deadline = time.monotonic() + 30
                while not crud.is_cancel_requested(s, job_id) and time.monotonic() < deadline:
                    time.sleep(0.02)
                crud.finish_job(s, job_id, "cancelled")
                return
            crud.add_event(s, job_id, phase="loading", message="loading the model", percent=2.0)
            for i in range(3):
                time.sleep(0.03)
                crud.add_event(s, job_id, phase="pruning", message=f"layer {i + 1}/3 pruned",
                               layer=i, num_layers=3, percent=10.0 + 25.0 * (i + 1),
                               eta_s=0.1 * (3 - i))
            out = Path(settings.artifacts_dir) / job_id  # type: ignore[arg-type]
            for name, data in ARTIFACTS.items():
                path = out / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                crud.add_artifact(s, job_id, path, len(data), hashlib.sha256(data).hexdigest())
            crud.finish_job(s, job_id, "succeeded",
                            metrics={"params_before": 134_515_008, "params_after": 107_612_006,
                                     "perplexity_before": 20.5, "perplexity_after": 27.25},
                            result={"artifact_dir": str(out)})

    return run


@dataclass
class ThreadWorker:
    """Stands in for the embedded worker: runs every queued job at once on its own thread (so
    the *client* must limit concurrency) and records, when it picks a job up, how many of that
    tenant's jobs were queued or running."""

    settings: Settings
    active_at_enqueue: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.runner = fake_runner(self.settings)
        self.factory = db_session.get_session_factory(self.settings)
        self.seen: set[str] = set()
        self.wake = notify.subscribe()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout)
        notify.unsubscribe(self.wake)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.clear()
            with self.factory() as s:
                new = [(j, t) for j, t in s.execute(
                    select(Job.id, Job.tenant_id).where(Job.state == "queued")
                    .order_by(Job.created_at)).all() if j not in self.seen]
                for job_id, tenant_id in new:
                    active = s.scalar(select(func.count()).select_from(Job).where(
                        Job.tenant_id == tenant_id, Job.state.in_(("queued", "running"))))
                    with self.lock:
                        self.active_at_enqueue.setdefault(str(tenant_id), []).append(
                            int(active or 0))
                    self.seen.add(job_id)
                    threading.Thread(target=self.runner, args=(job_id,), daemon=True).start()
                s.rollback()
            self.wake.wait(0.05)


@dataclass
class LiveServer:
    url: str
    settings: Settings
    worker: ThreadWorker

    def new_key(self) -> tuple[str, str]:
        """(tenant_id, api key) of a fresh tenant."""
        from app.crud.tenants import create_api_key

        with db_session.get_session_factory(self.settings)() as s:
            record, full = create_api_key(s, f"cli-{secrets.token_hex(4)}")
            return record.tenant_id, full


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from app.main import create_app
    from tests.live_server import serve_in_thread

    base = tmp_path_factory.mktemp("client-api")
    url = f"sqlite:///{base / 'slimgpt.db'}"
    upgrade(url)
    settings = Settings(data_dir=base, database_url=url, secret_key=Fernet.generate_key().decode(),
                        sse_poll_s=0.02, sse_heartbeat_s=0.5, auto_migrate=False)
    settings = settings.model_copy(update={"dispatcher_enabled": False})
    worker = ThreadWorker(settings)
    app = create_app(settings, embedded_worker=worker)
    try:
        with serve_in_thread(app) as base_url:
            yield LiveServer(base_url, settings, worker)
    finally:
        db_session.dispose_engines(url)


@pytest.fixture
def api_key(live_server: LiveServer) -> str:
    return live_server.new_key()[1]


@pytest.fixture(autouse=True)
def _client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No retries (fast failures), no key or URL from the developer's environment."""
    monkeypatch.setenv("SLIMGPT_CLIENT_RETRIES", "0")
    monkeypatch.delenv("SLIMGPT_API_KEY", raising=False)
    monkeypatch.delenv("SLIMGPT_URL", raising=False)
    monkeypatch.setenv("SLIMGPT_DATA_DIR", str(tmp_path / "no-data-dir"))
