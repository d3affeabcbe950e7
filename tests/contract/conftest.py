"""A live API (uvicorn on 127.0.0.1, SQLite in a temp dir) for contract tests: its embedded
worker's runner ends every job at once (failed with the worker's `hub_offline` code), so event
streams end, and jobs never need a model."""

from __future__ import annotations

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
    from app.crud.tenants import create_api_key
    from app.main import create_app
    from tests.live_server import serve_in_thread

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
    try:
        with serve_in_thread(app) as base_url:
            yield Live(base_url, key, settings)
    finally:
        db_session.dispose_engines(url)
