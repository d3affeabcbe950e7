"""The service path of models that do not fit: streamed from disk, on one or two "GPUs".

Embedded mode (SQLite, the real embedded worker and runner). ``SLIMGPT_STREAM_MODELS=always``
stands in for a model larger than host memory; two ranks on gloo stand in for two GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app

from .conftest import job_body, upload_calibration, wait_until

pytestmark = pytest.mark.timeout(300)


def _run(tiny_models: Path, tmp_path: Path, **body: object) -> tuple[dict, list[dict], Settings]:
    settings = Settings(data_dir=tmp_path / "data", local_models_dir=tiny_models,
                        cache_dir=tmp_path / "cache", secret_key=Fernet.generate_key().decode(),
                        auth_disabled=True, stream_models="always", worker_gpus=2)
    app = create_app(settings)
    with TestClient(app) as client:
        r = client.post("/v1/jobs", json=job_body("tiny4", upload_calibration(client), **body))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]

        def finished() -> dict | None:
            job = client.get(f"/v1/jobs/{job_id}").json()
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        job = wait_until(finished, 250, "the job to finish")
        events = client.get(f"/v1/jobs/{job_id}/events",
                            headers={"accept": "application/json"}).json()
    return job, events, settings


def test_a_streamed_job_publishes_a_verified_model_with_perplexities(tiny_models: Path,
                                                                     tmp_path: Path) -> None:
    job, events, settings = _run(tiny_models, tmp_path)
    assert job["state"] == "succeeded", job["error"]
    assert any("streamed from its shards on 1 GPU" in e["message"] for e in events)
    m = job["metrics"]
    assert m["perplexity_before"] > 1 and m["perplexity_after"] > 1
    assert m["verification"]["passed"] and m["verification"]["streamed"]
    folder = Path(settings.artifacts_dir) / job["id"] / "model"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert any(k.startswith("model.layers.3.") for k in index["weight_map"])
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]  # checkpoints gone


def test_a_two_rank_job_matches_the_one_rank_job(tiny_models: Path, tmp_path: Path) -> None:
    one, _, s1 = _run(tiny_models, tmp_path / "one")
    two, events, s2 = _run(tiny_models, tmp_path / "two", resources={"gpus": 2})
    assert two["state"] == "succeeded", two["error"]
    assert any("on 2 GPU(s)" in e["message"] for e in events)
    a = json.loads((Path(s1.artifacts_dir) / one["id"] / "model" / "pruning_config.json")
                   .read_text())
    b = json.loads((Path(s2.artifacts_dir) / two["id"] / "model" / "pruning_config.json")
                   .read_text())
    assert [(x["heads_kept"], x["channels_kept"]) for x in a["layers"]] == \
        [(x["heads_kept"], x["channels_kept"]) for x in b["layers"]]
