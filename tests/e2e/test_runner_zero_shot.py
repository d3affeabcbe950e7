"""Zero-shot tasks through lm-evaluation-harness (the `zeroshot` extra), offline: a task of our
own on a local JSON file (lm-eval's own tasks fetch their datasets from the Hub), run by the
real embedded worker on the pruned model; the result and the card say what was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from huggingface_hub import ModelCard

from app.core.config import Settings
from app.main import create_app

from .conftest import job_body, upload_calibration, wait_until

pytest.importorskip("lm_eval")  # the dev install has the `zeroshot` extra
pytestmark = pytest.mark.timeout(240)

TASK = """task: slimgpt_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _task_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir()
    words = ["the", "model", "of", "a", "pruned", "layer", "keeps", "its", "heads", "and",
             "channels", "in", "order"]
    rows = [{"question": " ".join(words[i % 5:i % 5 + 4]),
             "choices": [words[(i + k) % len(words)] for k in range(3)], "label": i % 3}
            for i in range(12)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "tiny_mc.yaml").write_text(TASK.format(data=folder / "mc.jsonl"))
    return folder


def _run(tiny_models: Path, tmp_path: Path, evaluate: dict) -> tuple[dict, Settings]:
    settings = Settings(data_dir=tmp_path / "data", local_models_dir=tiny_models,
                        cache_dir=tmp_path / "cache", secret_key=Fernet.generate_key().decode(),
                        auth_disabled=True, speed_benchmark=False,
                        zero_shot_tasks_dir=_task_dir(tmp_path))
    with TestClient(create_app(settings)) as client:
        body = job_body("tiny4", upload_calibration(client))
        body["evaluate"].update(evaluate)
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]

        def finished() -> dict | None:
            job = client.get(f"/v1/jobs/{job_id}").json()
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        job = wait_until(finished, 200, "the job to finish")
        job["events"] = client.get(f"/v1/jobs/{job_id}/events",
                                   headers={"accept": "application/json"}).json()
    return job, settings


def test_zero_shot_accuracy_of_the_pruned_model_is_in_the_metrics_and_the_card(
        tiny_models: Path, tmp_path: Path) -> None:
    job, settings = _run(tiny_models, tmp_path,
                         {"zero_shot_tasks": ["slimgpt_tiny_mc"], "zero_shot_limit": 8})
    assert job["state"] == "succeeded", job["error"]
    result = job["metrics"]["zero_shot"]["slimgpt_tiny_mc"]
    assert result["samples"] == 8 and result["num_fewshot"] == 0
    assert 0.0 <= result["acc"] <= 1.0 and 0.0 <= result["acc_norm"] <= 1.0
    assert result["dataset"] is None and result["split"] == "test"  # a local file, no Hub id
    (folder,) = {p.parent for p in Path(settings.artifacts_dir).glob(f"{job['id']}/**/README.md")}
    assert json.loads((folder / "pruning_config.json").read_text())["zero_shot"] == {
        "slimgpt_tiny_mc": result | {"limit": 8}}
    card = ModelCard.load(folder / "README.md")
    assert f"| zero-shot slimgpt_tiny_mc acc (a local task file, 8 examples; lm-eval) | – | " \
           f"{result['acc']:.4f} |" in card.text
    # Only Hub datasets go into model-index: others could not evaluate on a local file.
    assert all(r.metric_type == "perplexity" for r in card.data.eval_results or [])


def test_an_unknown_zero_shot_task_fails_the_job_before_pruning(
        tiny_models: Path, tmp_path: Path) -> None:
    job, _ = _run(tiny_models, tmp_path, {"zero_shot_tasks": ["no_such_task_xyz"]})
    assert job["state"] == "failed"
    assert job["error"].startswith("zero_shot_unavailable: unknown lm-eval task(s): "
                                   "no_such_task_xyz")
    assert job["error_code"] == "zero_shot_unavailable"
    assert not [e for e in job["events"] if e["phase"] == "pruning"]
