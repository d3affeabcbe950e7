from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants

from worker.errors import (
    GATED_MESSAGE,
    GatedModelError,
    HubUnavailableError,
    ModelNotFoundError,
    ModelRevisionNotFoundError,
    ModelSourceError,
    UnsupportedModelError,
)
from worker.model_source import ModelSource
from worker.retry import RetryPolicy

from .hub_fakes import LLAMA_CONFIG, SHA, FakeHub, hub_http_error

GOOD_FILES = {
    "config.json": LLAMA_CONFIG,
    "model.safetensors": "weights",
    "tokenizer.json": "{}",
    "pytorch_model.bin": "pickle",
    "README.md": "card",
}


def make_source(hub: FakeHub, **kwargs: object) -> ModelSource:
    return ModelSource(
        cache_dir=hub.cache,
        retry_policy=RetryPolicy(max_attempts=3, base_delay_s=0),
        snapshot_download_fn=hub.snapshot_download,
        model_info_fn=hub.model_info,
        sleep=lambda s: None,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    # Still no network: the Hub functions are fakes; this only lets the code take its online path.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hub_model_is_pinned_and_filtered(tmp_path: Path, online: None) -> None:
    hub = FakeHub(tmp_path, GOOD_FILES)
    model = make_source(hub).resolve("org/tiny-llama", revision="main", token="hf_" + "x" * 34)
    assert model.kind == "hub" and model.revision == SHA and model.model_type == "llama"
    names = sorted(p.name for p in model.path.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]  # no .bin, no card
    downloads = [kw for name, kw in hub.calls if name == "snapshot_download"]
    assert [d["revision"] for d in downloads] == [SHA, SHA]  # pinned after the lookup
    assert downloads[0]["allow_patterns"] == ["config.json"]


def test_no_token_means_no_token_not_the_machines(tmp_path: Path, online: None) -> None:
    hub = FakeHub(tmp_path, GOOD_FILES)
    make_source(hub).resolve("org/tiny-llama")
    assert all(kw["token"] is False for _, kw in hub.calls)


def test_offline_mode_uses_the_cache_without_lookup(tmp_path: Path) -> None:
    hub = FakeHub(tmp_path, GOOD_FILES)
    model = make_source(hub).resolve("org/tiny-llama")
    assert model.revision == SHA
    assert [name for name, _ in hub.calls] == ["snapshot_download", "snapshot_download"]


def test_unsupported_model_type_fails_before_weights(tmp_path: Path, online: None) -> None:
    hub = FakeHub(tmp_path, {**GOOD_FILES, "config.json": '{"model_type": "bert"}'})
    with pytest.raises(UnsupportedModelError, match="bert.*not supported.*llama, mistral, mixtral.*qwen3, qwen3_moe"):
        make_source(hub).resolve("org/bert")
    assert len([c for c in hub.calls if c[0] == "snapshot_download"]) == 1


def test_moe_variant_the_adapter_refuses_fails_before_weights(tmp_path: Path,
                                                             online: None) -> None:
    config = ('{"model_type": "qwen3_moe", "mlp_only_layers": [0], "hidden_size": 64, '
              '"num_experts": 4}')
    hub = FakeHub(tmp_path, {**GOOD_FILES, "config.json": config})
    with pytest.raises(UnsupportedModelError, match="org/moe.*dense FFN layers.*not supported"):
        make_source(hub).resolve("org/moe")
    assert len([c for c in hub.calls if c[0] == "snapshot_download"]) == 1


def test_pickle_only_model_is_refused_before_download(tmp_path: Path, online: None) -> None:
    hub = FakeHub(tmp_path, {"config.json": LLAMA_CONFIG, "pytorch_model.bin": "pickle"})
    with pytest.raises(UnsupportedModelError, match="pickles"):
        make_source(hub).resolve("org/old-llama")
    assert [c[0] for c in hub.calls] == ["model_info"]


@pytest.mark.parametrize(
    ("error", "token", "expected", "text"),
    [
        (hub_http_error(401, error_code="GatedRepo"), None, GatedModelError, GATED_MESSAGE),
        (hub_http_error(403, error_code="GatedRepo"), "hf_" + "t" * 34, GatedModelError, "license"),
        (hub_http_error(404, error_code="RepoNotFound"), "hf_" + "t" * 34, ModelNotFoundError,
         "not found"),
        (hub_http_error(404, error_code="RevisionNotFound"), None, ModelRevisionNotFoundError,
         "revision"),
    ],
)
def test_hub_errors_become_user_errors(
    tmp_path: Path, online: None, error: Exception, token: str | None,
    expected: type[Exception], text: str,
) -> None:
    hub = FakeHub(tmp_path, GOOD_FILES)
    hub.errors = [error]
    with pytest.raises(expected, match=text):
        make_source(hub).resolve("org/model", revision="v1", token=token)


def test_transient_errors_are_retried_then_surface(tmp_path: Path, online: None) -> None:
    hub = FakeHub(tmp_path, GOOD_FILES)
    hub.errors = [hub_http_error(429, headers={"Retry-After": "1"}), hub_http_error(503)]
    assert make_source(hub).resolve("org/model").revision == SHA
    hub.errors = [hub_http_error(502)] * 3
    with pytest.raises(HubUnavailableError) as info:
        make_source(hub).resolve("org/model")
    assert info.value.retryable


def test_invalid_repo_id(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="not a valid Hub repo id"):
        make_source(FakeHub(tmp_path, {})).resolve("bad//id--")


def test_local_folder_under_root(tmp_path: Path) -> None:
    root = tmp_path / "models"
    folder = root / "team" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    (folder / "model.safetensors").write_text("w")
    source = make_source(FakeHub(tmp_path / "cache", {}), local_models_dir=root)
    model = source.resolve("team/tiny")
    assert (model.kind, model.model_type, model.path) == ("local", "qwen2", folder.resolve())
    assert source.resolve(str(folder)).path == folder.resolve()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(ModelSourceError, match="outside"):
        source.resolve(str(outside))
    with pytest.raises(ModelSourceError, match="outside"):
        source.resolve("../elsewhere")
    (root / "link").symlink_to(outside)
    with pytest.raises(ModelSourceError, match="outside"):
        source.resolve(str(root / "link"))


def test_local_paths_refused_without_a_root(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="SLIMGPT_LOCAL_MODELS_DIR"):
        make_source(FakeHub(tmp_path, {})).resolve("/etc/model.gguf")


def test_gguf_file(tmp_path: Path) -> None:
    import gguf

    root = tmp_path / "models"
    root.mkdir()
    for arch in ("llama", "gpt2"):
        writer = gguf.GGUFWriter(root / f"{arch}.gguf", arch)
        writer.add_tensor("w", np.zeros(4, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    source = make_source(FakeHub(tmp_path / "cache", {}), local_models_dir=root)
    model = source.resolve("llama.gguf")
    assert (model.kind, model.model_type) == ("gguf", "llama")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        source.resolve("gpt2.gguf")
