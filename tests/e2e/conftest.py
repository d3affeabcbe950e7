"""End-to-end fixtures: tiny local models, embedded apps on SQLite, Postgres databases."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slimgpt_core.calibration import BUNDLED_CALIBRATION, bundled_text
from tests.api.conftest import TempPostgres, postgres_admin_url  # noqa: F401 - re-used helpers

from .tiny import save_tiny_llama

CALIB_TEXT = bundled_text(BUNDLED_CALIBRATION)[:40_000]


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("SLIMGPT_TEST_LAYER_DELAY_S", raising=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local-models root holding ``tiny4`` (4 layers) and ``tiny6`` (6 layers)."""
    root = tmp_path_factory.mktemp("models")
    save_tiny_llama(root / "tiny4", layers=4, seed=0)
    save_tiny_llama(root / "tiny6", layers=6, seed=1)
    return root


def job_body(model_id: str, calibration_file_id: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_id": model_id,
        "target_ratio": 0.3,
        "calibration": {"source": calibration_file_id, "num_samples": 4, "seq_len": 32},
        "pruning": {"min_group": 16},
        # Offline: evaluate on the uploaded text (the default, wikitext2, needs the Hub).
        "evaluate": {"perplexity": True, "eval_source": calibration_file_id, "num_windows": 4,
                     "seq_len": 32},
    }
    body.update(extra)
    return body


def upload_calibration(client: Any, headers: dict[str, str] | None = None) -> str:
    r = client.post("/v1/files?filename=calib.txt", content=CALIB_TEXT.encode(),
                    headers={"content-type": "text/plain", **(headers or {})})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               on_timeout: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    detail = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail}")


@pytest.fixture(scope="session")
def pg_admin() -> str:
    url = postgres_admin_url()
    if url is None:
        pytest.skip("no PostgreSQL at SLIMGPT_TEST_POSTGRES_URL")
    return url


REDIS_URL = os.environ.get("SLIMGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
