"""Every bad input is a 4xx that says what is wrong, never a 500."""

from __future__ import annotations

import json
import os

import pytest

from slimgpt_core.families import supported_model_types

BASE = {"model_id": "HuggingFaceTB/SmolLM2-135M", "target_ratio": 0.2}


def _post(client, tenant, body, **kw):
    return client.post("/v1/jobs", json=body, headers=tenant.headers, **kw)


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"target_ratio": 0}, "target_ratio"),
        ({"target_ratio": 0.95}, "target_ratio"),
        ({"target_ratio": -0.1}, "target_ratio"),
        ({"target_ratio": "lots"}, "target_ratio"),
        ({"model_id": "not a repo"}, "model_id"),
        ({"model_id": "a--b/c"}, "model_id"),
        ({"model_id": "owner/name/extra"}, "model_id"),
        ({"model_id": ""}, "model_id"),
        ({"revision": "../main"}, "revision"),
        ({"revision": "has space"}, "revision"),
        ({"schedule": "exponential"}, "schedule"),
        ({"schedule": [0.1, 0.99]}, "schedule"),
        ({"schedule": []}, "schedule"),
        ({"calibration": {"source": "pile"}}, "calibration.source"),
        ({"calibration": {"num_samples": 0}}, "calibration.num_samples"),
        ({"calibration": {"seq_len": 1}}, "calibration.seq_len"),
        ({"calibration": {"seed": -1}}, "calibration.seed"),
        ({"pruning": {"percdamp": 0}}, "pruning.percdamp"),
        ({"pruning": {"min_group": 0}}, "pruning.min_group"),
        ({"pruning": {"gqa_policy": "any"}}, "pruning.gqa_policy"),
        ({"pruning": {"alpha": 1.5}}, "pruning.alpha"),
        ({"pruning": {"heads": 0.99}}, "pruning.heads"),
        ({"pruning": {"ffn": -0.1}}, "pruning.ffn"),
        ({"export": {"profile": "gguf"}}, "export.profile"),
        ({"destination": {"hub_repo_id": "no slash"}}, "destination.hub_repo_id"),
        ({"evaluate": {"eval_source": "pile"}}, "evaluate.eval_source"),
        ({"evaluate": {"perplexity": "maybe"}}, "evaluate.perplexity"),
        ({"heal": {"tokens": 10}}, "heal.tokens"),
        ({"heal": {"mode": "qlora"}}, "heal.mode"),
        ({"export": {"profile": "uniform"}, "pruning": {"gqa_policy": "free"}}, "gqa_policy"),
        ({"pruning": {"preset": "best"}}, "pruning.preset"),
        ({"pruning": {"preset": "quality"}, "resources": {"gpus": 2}}, "one GPU"),
    ],
)
def test_invalid_field_is_422_naming_the_field(client, tenant, patch, needle):
    r = _post(client, tenant, {**BASE, **patch})
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


def test_a_check_across_fields_points_at_the_field_it_names(client, tenant):
    r = _post(client, tenant, {**BASE, "pruning": {"preset": "quality"},
                               "resources": {"gpus": 2}})
    assert r.status_code == 422, r.text
    [error] = r.json()["errors"]
    assert error["pointer"] == "#/pruning/preset"
    assert error["detail"].startswith("pruning.preset 'quality': ")


def test_missing_required_fields_are_422(client, tenant):
    r = _post(client, tenant, {})
    assert r.status_code == 422
    assert "model_id: field required" in r.json()["detail"]
    assert "target_ratio: field required" in r.json()["detail"]


def test_unknown_top_level_field_is_422(client, tenant):
    r = _post(client, tenant, {**BASE, "turbo": True})
    assert r.status_code == 422 and "turbo: unknown field" in r.json()["detail"]


def test_unknown_nested_field_is_422(client, tenant):
    r = _post(client, tenant, {**BASE, "pruning": {"percdamp": 0.01, "blocksize": 128}})
    assert r.status_code == 422 and "pruning.blocksize: unknown field" in r.json()["detail"]


def test_malformed_json_is_400(client, tenant):
    r = client.post("/v1/jobs", content=b'{"model_id": ', headers={
        **tenant.headers, "content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]


def test_non_object_body_is_422(client, tenant):
    r = client.post("/v1/jobs", json=[1, 2], headers=tenant.headers)
    assert r.status_code == 422


def test_oversize_body_is_413(client, tenant, settings):
    big = {**BASE, "model_id": "a/" + "b" * (settings.max_body_bytes + 10)}
    r = _post(client, tenant, big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_oversize_chunked_body_is_413(client, tenant, settings):
    def gen():
        yield b'{"model_id": "a/b", "target_ratio": 0.2, "x": "'
        for _ in range(settings.max_body_bytes // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    r = client.post("/v1/jobs", content=gen(), headers={
        **tenant.headers, "content-type": "application/json"})
    assert r.status_code == 413


def test_uniform_profile_with_explicit_log_schedule_is_422(client, tenant):
    r = _post(client, tenant, {**BASE, "schedule": "log", "export": {"profile": "uniform"}})
    assert r.status_code == 422 and "uniform" in r.json()["detail"]


def test_uniform_profile_without_schedule_sets_uniform_schedule(client, tenant):
    r = _post(client, tenant, {**BASE, "export": {"profile": "uniform"}})
    assert r.status_code == 202 and r.json()["request"]["schedule"] == "uniform"


def test_uniform_profile_accepts_equal_explicit_ratios(client, tenant):
    r = _post(client, tenant, {**BASE, "schedule": [0.2, 0.2], "export": {"profile": "uniform"}})
    assert r.status_code == 202


def test_explicit_schedule_list_is_accepted(client, tenant):
    r = _post(client, tenant, {**BASE, "schedule": [0.1, 0.2, 0.3]})
    assert r.status_code == 202 and r.json()["request"]["schedule"] == [0.1, 0.2, 0.3]


def test_absolute_local_path_is_422(client, tenant):
    r = _post(client, tenant, {**BASE, "model_id": "/etc/passwd"})
    assert r.status_code == 422 and "absolute" in r.json()["detail"]


def test_dotdot_local_path_is_422(client, tenant):
    r = _post(client, tenant, {**BASE, "model_id": "../../etc"})
    assert r.status_code == 422 and "escapes" in r.json()["detail"]


def test_symlink_escaping_local_root_is_422(client, tenant, models_dir, tmp_path):
    link = models_dir / f"escape-{os.getpid()}-{tmp_path.name}"
    link.symlink_to(tmp_path, target_is_directory=True)
    r = _post(client, tenant, {**BASE, "model_id": link.name})
    assert r.status_code == 422 and "escapes" in r.json()["detail"]


def _local_model(models_dir, name: str, model_type: str | None) -> str:
    folder = models_dir / "tiny" / name
    folder.mkdir(parents=True, exist_ok=True)
    if model_type is not None:
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return f"tiny/{name}"


@pytest.mark.parametrize("model_type", supported_model_types())
def test_local_model_folder_of_every_supported_family_is_accepted(client, tenant, models_dir,
                                                                  model_type):
    r = _post(client, tenant, {**BASE, "model_id": _local_model(models_dir, model_type,
                                                                model_type)})
    assert r.status_code == 202, r.text
    assert r.json()["model_source"] == "local"


def test_unsupported_family_is_refused_at_submission_with_the_supported_list(
        client, tenant, models_dir):
    r = _post(client, tenant, {**BASE, "model_id": _local_model(models_dir, "bert", "bert")})
    detail = r.json()["detail"]
    assert r.status_code == 422 and detail.startswith("model_id:")
    assert "'bert' is not supported" in detail
    assert ", ".join(supported_model_types()) in detail


def test_local_folder_without_config_is_refused_at_submission(client, tenant, models_dir):
    r = _post(client, tenant, {**BASE, "model_id": _local_model(models_dir, "empty", None)})
    assert r.status_code == 422 and "no config.json" in r.json()["detail"]


def _gguf(models_dir, arch: str) -> str:
    import gguf
    import numpy as np

    models_dir.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(models_dir / f"{arch}-tiny.gguf", arch)
    writer.add_block_count(2)
    writer.add_tensor("w", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return f"{arch}-tiny.gguf"


def test_local_gguf_is_checked_by_its_header_architecture(client, tenant, models_dir):
    assert _post(client, tenant, {**BASE, "model_id": _gguf(models_dir, "qwen3")}).status_code == 202
    r = _post(client, tenant, {**BASE, "model_id": _gguf(models_dir, "gpt2")})
    assert r.status_code == 422 and "GGUF architecture 'gpt2' is not supported" in r.json()["detail"]


def test_hub_destination_without_token_is_422(client, tenant):
    r = _post(client, tenant, {**BASE, "destination": {"hub_repo_id": "me/slim"}})
    assert r.status_code == 422 and "hub-token" in r.json()["detail"]


def test_unknown_uploaded_calibration_file_is_422(client, tenant):
    r = _post(client, tenant, {**BASE, "calibration": {
        "source": "00000000-0000-4000-8000-000000000000"}})
    assert r.status_code == 422 and "calibration.source" in r.json()["detail"]


def test_bad_idempotency_key_header_is_422(client, tenant):
    r = client.post("/v1/jobs", json=BASE, headers={**tenant.headers,
                                                    "Idempotency-Key": "k" * 300})
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"]
