"""A live API (uvicorn on 127.0.0.1, SQLite in a temp dir) for contract tests: its embedded
worker's runner ends every job at once (failed with the worker's `hub_offline` code), so event
streams end, and jobs never need a model."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from app.core.config import Settings
from app.crud import jobs as crud
from app.db import session as db_session
from app.db.migrate import upgrade


@dataclass
class Live:
    url: str
    key: str
    settings: Settings


def _instant_runner(settings: Settings):  # type: ignore[no-untyped-def]
    factory = db_session.get_session_factory(settings)

    def run(job_id: str) -> None:
        with factory() as s:
            if crud.claim_job(s, job_id, "contract", 60) is None:
                return
            crud.add_event(s, job_id, phase="loading", message="resolving the model", percent=1)
            crud.finish_job(s, job_id, "failed",
                            error="hub_offline: the model is not in the local Hub cache",
                            metrics={"error_code": "hub_offline", "seconds": {"loading": 0.1}})

    return run


@pytest.fixture(scope="session")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    import uvicorn

    from app.crud.tenants import create_api_key
    from app.main import create_app

    base: Path = tmp_path_factory.mktemp("contract-api")
    url = f"sqlite:///{base / 'slimgpt.db'}"
    upgrade(url)
    settings = Settings(data_dir=base, database_url=url, secret_key=Fernet.generate_key().decode(),
                        sse_poll_s=0.02, sse_heartbeat_s=1.0, auto_migrate=False,
                        local_models_dir=base / "models", dispatcher_enabled=False,
                        rate_limit_per_minute=0)
    (base / "models").mkdir()
    with db_session.get_session_factory(settings)() as s:
        _, key = create_api_key(s, "contract")
    app = create_app(settings, runner=_instant_runner(settings))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the contract-test API did not start")
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", key, settings)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        db_session.dispose_engines(url)
