"""Embedded mode: SQLite, no broker, the real embedded worker and the real runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from worker.embedded import EmbeddedWorker

from .conftest import job_body, upload_calibration, wait_until

pytestmark = pytest.mark.timeout(240)

PHASES = ["loading", "calibrating", "pruning", "verifying", "evaluating", "publishing"]


def _settings(tiny_models: Path, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", local_models_dir=tiny_models,
                    cache_dir=tmp_path / "cache", secret_key=Fernet.generate_key().decode(),
                    auth_disabled=True)


def _wait_finished(client: TestClient, job_id: str) -> dict:
    def finished() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(finished, 200, "the job to finish")


def _run_job(settings: Settings, model_id: str, preset: str) -> tuple[dict, list[dict]]:
    """Run a job of ``preset`` on ``model_id`` to its end: the job and its event rows."""
    with TestClient(create_app(settings)) as client:
        body = job_body(model_id, upload_calibration(client),
                        pruning={"min_group": 16, "preset": preset})
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        job = _wait_finished(client, job_id)
        rows = client.get(f"/v1/jobs/{job_id}/events",
                          headers={"accept": "application/json"}).json()
    return job, rows


def test_runner_embedded_job_succeeds_with_metrics_events_and_artifacts(
        tiny_models: Path, tmp_path: Path) -> None:
    settings = _settings(tiny_models, tmp_path)
    assert settings.embedded and settings.is_sqlite
    app = create_app(settings)
    with TestClient(app) as client:
        assert isinstance(app.state.embedded_worker, EmbeddedWorker)
        file_id = upload_calibration(client)
        r = client.post("/v1/jobs", json=job_body("tiny4", file_id))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]

        job = _wait_finished(client, job_id)
        assert job["state"] == "succeeded", job["error"]
        m = job["metrics"]
        assert m["params_after"] < m["params_before"]
        assert m["perplexity_before"] > 1 and m["perplexity_after"] > 1
        # The result states what was measured.
        assert m["evaluation"] == {**m["evaluation"], "source": "upload", "file_id": file_id,
                                   "windows": 4, "seq_len": 32, "tokens": 128,
                                   "perplexity_after": m["perplexity_after"]}
        assert 0 < m["achieved_ratio"] < 1
        assert set(PHASES) <= set(m["seconds"])
        assert job["progress"]["percent"] == 100.0
        assert job["result"]["location"].startswith("file://")

        rows = client.get(f"/v1/jobs/{job_id}/events",
                          headers={"accept": "application/json"}).json()
        seqs = [e["seq"] for e in rows]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        phases = [e["phase"] for e in rows if e["phase"] in PHASES]
        order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
        assert order == PHASES, order
        layer_events = [e for e in rows if (e["metrics"] or {}).get("kind") == "layer_done"]
        assert [e["layer"] for e in layer_events] == [0, 1, 2, 3]
        assert [e["message"] for e in layer_events][-1] == "layer 4/4 done"
        assert rows[-1]["state"] == "succeeded"

        arts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
        names = {a["name"] for a in arts}
        assert {"model/config.json", "model/pruning_config.json", "model/README.md",
                "model/modeling_slimgpt.py"} <= names
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
        download = tmp_path / "download"
        for a in arts:
            got = client.get(a["download_url"])
            assert got.status_code == 200
            target = download / a["name"].removeprefix("model/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(got.content)
        # Only the published model is left: checkpoints and staging are gone.
        job_root = Path(settings.artifacts_dir) / job_id
        assert sorted(p.name for p in job_root.iterdir()) == ["model"]

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(download, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == m["params_after"]
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 9, 30]])).logits
    assert out.shape[-1] == model.config.vocab_size
    card = (download / "README.md").read_text()
    assert f"{m['perplexity_after']:.3f}" in card  # the card's own format
    # the measured speed-up of this job's own model (on this CPU), in the metrics and the card
    speed = m["speed"]
    assert speed["pruned_prefill_tok_s"] > 0 and speed["dense_prefill_tok_s"] > 0
    assert speed["param_ratio"] > 1
    assert f"({speed['prefill_speedup']:.2f}x)" in card
    assert "vllm serve" in card


def test_runner_embedded_nan_in_a_layer_fails_once_naming_the_layer(
        tiny_models: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from .tiny import save_tiny_llama

    folder = save_tiny_llama(tiny_models / "tiny4-nan", layers=4, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():  # what an fp16 overflow in layer 2 looks like downstream
        model.model.layers[2].self_attn.v_proj.weight[0, 0] = float("inf")
    model.save_pretrained(folder)
    settings = _settings(tiny_models, tmp_path)
    with TestClient(create_app(settings)) as client:
        body = job_body("tiny4-nan", upload_calibration(client),
                        evaluate={"perplexity": False})
        job_id = client.post("/v1/jobs", json=body).json()["id"]

        job = _wait_finished(client, job_id)
    assert job["state"] == "failed"
    assert job["error"].startswith("non_finite_hessian: layer 2 self_attn.o_proj:")
    assert job["attempts"] == 1  # more damping cannot help: no retry


def test_runner_embedded_heal_distils_after_pruning_and_reports_it(
        tiny_models: Path, tmp_path: Path) -> None:
    settings = _settings(tiny_models, tmp_path)
    with TestClient(create_app(settings)) as client:
        body = job_body("tiny4", upload_calibration(client), heal={"tokens": 1_000})
        job_id = client.post("/v1/jobs", json=body).json()["id"]

        job = _wait_finished(client, job_id)
        rows = client.get(f"/v1/jobs/{job_id}/events",
                          headers={"accept": "application/json"}).json()
    assert job["state"] == "succeeded", job["error"]
    heal = job["metrics"]["heal"]
    assert heal["mode"] == "lora" and heal["steps"] == 1_000 // (4 * 32) and heal["tokens"] > 0
    assert "healing" in job["metrics"]["seconds"]
    heal_events = [e for e in rows if (e["metrics"] or {}).get("kind") == "heal"]
    assert heal_events and heal_events[-1]["metrics"]["step"] == heal["steps"]
    # Healing happens after the last layer and before the export is verified.
    phases = [e["phase"] for e in rows]
    assert phases.index("verifying") > rows.index(heal_events[-1])
    # The published card's recipe records the healing step with the pruning settings.
    from huggingface_hub import ModelCard

    (card_path,) = Path(settings.artifacts_dir).glob(f"**/{job_id}/**/README.md")
    recipe = ModelCard.load(card_path).data.to_dict()["slimgpt_recipe"]
    assert recipe["heal"]["tokens"] == 1_000 and recipe["heal"]["mode"] == "lora"
    assert recipe["heal"]["windows"] == 1_000 // 32 and recipe["calibration"]["source"]
    assert recipe["pruning"]["percdamp"] == 0.01 and recipe["dtype"]


@pytest.mark.parametrize(("preset", "allocation"), [("quality", "sensitivity"),
                                                    ("thorough", "search")])
def test_runner_embedded_preset_prunes_with_its_options_and_the_card_names_it(
        tiny_models: Path, tmp_path: Path, preset: str, allocation: str) -> None:
    settings = _settings(tiny_models, tmp_path)
    job, rows = _run_job(settings, "tiny4", preset)
    job_id = job["id"]
    assert job["state"] == "succeeded", job["error"]
    # the whole-model passes before the first layer are on the job's timeline
    kinds = [(e["metrics"] or {}).get("kind") for e in rows if e["phase"] == "pruning"]
    assert kinds.index("fisher") < kinds.index("allocation") < kinds.index("layer_done")
    from huggingface_hub import ModelCard

    (card_path,) = Path(settings.artifacts_dir).glob(f"**/{job_id}/**/README.md")
    card = ModelCard.load(card_path)
    pruning = card.data.to_dict()["slimgpt_recipe"]["pruning"]
    assert (pruning["selection"], pruning["fisher_samples"], pruning["target"],
            pruning["allocation"]) == ("fisher", 8, "dense", allocation)
    assert f"--preset {preset}" in card.text


def test_runner_embedded_thorough_preset_whose_levels_overfill_fails_at_once_naming_quality(
        tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slimgpt_core import alloc_search

    monkeypatch.setattr(alloc_search, "CPU_LEVEL_BYTES", 4096)
    job, rows = _run_job(_settings(tiny_models, tmp_path), "tiny4", "thorough")
    assert job["state"] == "failed"
    assert job["error"].startswith("setting_unavailable: allocation 'search' keeps every")
    assert job["error"].endswith("submit with pruning.preset 'quality'")
    assert job["attempts"] == 1
    assert "calibrating" not in {e["phase"] for e in rows}


def test_runner_embedded_preset_a_family_cannot_run_fails_at_once_before_calibrating(
        tiny_models: Path, tmp_path: Path) -> None:
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from .tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    folder = tiny_models / "tiny-olmo2"
    Olmo2ForCausalLM(Olmo2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    job, rows = _run_job(_settings(tiny_models, tmp_path), "tiny-olmo2", "quality")
    assert job["state"] == "failed"
    assert job["error"].startswith("setting_unavailable: target 'dense' needs each branch's")
    assert "preset 'standard'" in job["error"]
    assert job["attempts"] == 1  # every attempt would end the same way
    assert "calibrating" not in {e["phase"] for e in rows}
