"""POST /v1/estimate: the torch-free dry run."""

from __future__ import annotations

import json

SMOL = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
        "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
        "vocab_size": 49152, "tie_word_embeddings": True}


def test_estimate_from_config(client, tenant):
    r = client.post("/v1/estimate", json={"config": SMOL, "target_ratio": 0.2},
                    headers=tenant.headers)
    assert r.status_code == 200, r.text
    plan = r.json()
    assert len(plan["layers"]) == 30 and plan["schedule"] == "log"
    assert abs(plan["achieved_ratio"] - 0.2) < 0.02
    assert plan["total_params_after"] < plan["total_params_before"]


def test_estimate_of_the_quality_preset_keeps_the_totals_and_says_what_it_does_not_show(
        client, tenant):
    standard = client.post("/v1/estimate", json={"config": SMOL, "target_ratio": 0.2},
                           headers=tenant.headers).json()
    r = client.post("/v1/estimate", json={"config": SMOL, "target_ratio": 0.2,
                                          "pruning": {"preset": "quality"}},
                    headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert r.json()["total_params_after"] == standard["total_params_after"]
    assert any("preset 'quality'" in note for note in r.json()["notes"])


def test_estimate_of_a_config_without_model_type_reads_it_as_llama(client, tenant):
    bare = {k: v for k, v in SMOL.items() if k != "model_type"}
    for preset in ("standard", "quality"):
        r = client.post("/v1/estimate", json={"config": bare, "target_ratio": 0.2,
                                              "pruning": {"preset": preset}},
                        headers=tenant.headers)
        assert r.status_code == 200, r.text


def test_estimate_of_a_preset_the_family_cannot_run_is_422(client, tenant):
    olmo2 = {**SMOL, "model_type": "olmo2", "num_attention_heads": 8, "num_key_value_heads": 8,
             "hidden_size": 512}
    r = client.post("/v1/estimate", json={"config": olmo2, "target_ratio": 0.2,
                                          "pruning": {"preset": "quality"}},
                    headers=tenant.headers)
    assert r.status_code == 422 and "normalises it first" in r.json()["detail"], r.text


def test_estimate_from_local_model_folder(client, tenant, models_dir):
    folder = models_dir / "smol-est"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SMOL))
    r = client.post("/v1/estimate", json={"model_id": "smol-est", "target_ratio": 0.3,
                                          "export": {"profile": "uniform"}},
                    headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert r.json()["schedule"] == "uniform" and r.json()["export_profile"] == "uniform"


def test_estimate_of_hub_model_without_config_is_422(client, tenant):
    r = client.post("/v1/estimate", json={"model_id": "owner/model", "target_ratio": 0.2},
                    headers=tenant.headers)
    assert r.status_code == 422 and "config" in r.json()["detail"]


def test_estimate_needs_exactly_one_source(client, tenant):
    r = client.post("/v1/estimate", json={"target_ratio": 0.2}, headers=tenant.headers)
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]


def test_estimate_plan_error_is_422(client, tenant):
    bad = {**SMOL, "model_type": "gpt2"}
    r = client.post("/v1/estimate", json={"config": bad, "target_ratio": 0.2},
                    headers=tenant.headers)
    detail = r.json()["detail"]
    assert r.status_code == 422 and "'gpt2' is not supported" in detail
    assert all(t in detail for t in ("llama", "qwen3", "gemma3_text", "phi3", "olmo2", "granite",
                                     "mixtral", "qwen3_moe"))


def test_estimate_missing_config_key_is_422(client, tenant):
    bad = {k: v for k, v in SMOL.items() if k != "hidden_size"}
    r = client.post("/v1/estimate", json={"config": bad, "target_ratio": 0.2},
                    headers=tenant.headers)
    assert r.status_code == 422 and "hidden_size" in r.json()["detail"]


def test_estimate_explicit_schedule_of_wrong_length_is_422(client, tenant):
    r = client.post("/v1/estimate", json={"config": SMOL, "target_ratio": 0.2,
                                          "schedule": [0.1, 0.2]}, headers=tenant.headers)
    assert r.status_code == 422 and "30 layers" in r.json()["detail"]


def test_estimate_ratio_out_of_range_is_422(client, tenant):
    r = client.post("/v1/estimate", json={"config": SMOL, "target_ratio": 0.95},
                    headers=tenant.headers)
    assert r.status_code == 422 and "target_ratio" in r.json()["detail"]


def test_estimate_needs_auth(client):
    assert client.post("/v1/estimate", json={"config": SMOL, "target_ratio": 0.2}).status_code == 401
