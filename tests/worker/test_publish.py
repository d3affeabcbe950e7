from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from worker.errors import HubAuthError, HubUnavailableError, PublishError
from worker.publish import HubDestination, HubPublisher, LocalPublisher, publishable_files
from worker.redact import install_redaction
from worker.retry import RetryPolicy

from .fake_hub_server import COMMIT_SHA, FakeHubState, committed_files, fake_hub

TOKEN = "hf_" + "FakeTok3n" * 4
CARD = "---\nlicense: apache-2.0\nbase_model: org/base\n---\n# Pruned model\n"


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text(CARD)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 64)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\x01" * 64)
    (folder / "pruning_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHubState]:
    # The fake lives on 127.0.0.1; offline mode would block huggingface_hub from reaching it.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with fake_hub() as state:
        yield state


def publisher(hub: FakeHubState, **kwargs: object) -> HubPublisher:
    return HubPublisher(
        token=TOKEN, endpoint=hub.base_url,
        retry_policy=RetryPolicy(max_attempts=3, base_delay_s=0), sleep=lambda s: None,
        **kwargs,  # type: ignore[arg-type]
    )


def test_publishable_files_refuses_pickles_and_puts_card_last(model_folder: Path) -> None:
    files = [f.as_posix() for f in publishable_files(model_folder)]
    assert files[-1] == "README.md" and len(files) == 6
    (model_folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PublishError, match="pickle"):
        publishable_files(model_folder)


def test_local_publisher_is_atomic_and_idempotent(tmp_path: Path, model_folder: Path) -> None:
    pub = LocalPublisher(tmp_path / "artifacts")
    result = pub.publish(model_folder, job_id="job-1", destination=None)
    target = tmp_path / "artifacts" / "job-1" / "model"
    assert result.location == target.resolve().as_uri()
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in model_folder.iterdir())
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".model-staging")]
    (model_folder / "config.json").write_text("changed")
    again = pub.publish(model_folder, job_id="job-1", destination=None)
    assert again == result and (target / "config.json").read_text() == '{"model_type": "llama"}'
    with pytest.raises(PublishError, match="job id"):
        pub.publish(model_folder, job_id="../escape", destination=None)


def test_local_publisher_move(tmp_path: Path, model_folder: Path) -> None:
    result = LocalPublisher(tmp_path / "a", move=True).publish(model_folder, job_id="j2",
                                                               destination=None)
    assert not model_folder.exists() and result.location.startswith("file://")


def test_hub_publisher_one_private_commit_card_last(hub: FakeHubState, model_folder: Path) -> None:
    result = publisher(hub).publish(
        model_folder, job_id="job-7", destination=HubDestination("acme/tiny-pruned")
    )
    [create] = hub.route("create_repo")
    assert create.json() == {"name": "tiny-pruned", "organization": "acme",
                             "visibility": "private", "type": "model"}
    [commit] = hub.route("commit")
    assert commit.path == "/api/models/acme/tiny-pruned/commit/main"
    assert "create_pr" not in commit.query
    files = committed_files(commit)
    names = [name for name, _ in files]
    assert names[-1] == "README.md"
    assert sorted(names) == sorted(p.name for p in model_folder.iterdir())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    assert dict(files)["README.md"].decode() == CARD
    header = commit.ndjson()[0]
    assert header["key"] == "header" and "job-7" in header["value"]["summary"]
    assert result.commit_sha == COMMIT_SHA
    assert result.url == f"{hub.base_url}/acme/tiny-pruned/commit/{COMMIT_SHA}"
    assert result.pr_url is None and result.location == f"{hub.base_url}/acme/tiny-pruned"


def test_hub_publisher_public_and_pr_mode(hub: FakeHubState, model_folder: Path) -> None:
    result = publisher(hub).publish(
        model_folder, job_id="job-8",
        destination=HubDestination("acme/tiny", private=False, create_pr=True),
    )
    assert hub.route("create_repo")[0].json().get("visibility") == "public"
    [commit] = hub.route("commit")
    assert commit.query.get("create_pr") == ["1"]
    assert result.pr_url == f"{hub.base_url}/acme/tiny/discussions/1"
    assert result.location == result.pr_url


def test_hub_publisher_retries_429_and_503(hub: FakeHubState, model_folder: Path) -> None:
    hub.failures = {
        "create_repo": [(429, {"Retry-After": "0"})],
        "commit": [(503, {})],
    }
    result = publisher(hub).publish(model_folder, job_id="job-9",
                                    destination=HubDestination("acme/tiny"))
    assert result.commit_sha == COMMIT_SHA
    assert len(hub.route("create_repo")) == 2 and len(hub.route("commit")) == 2
    # The retried commit carries every file again, card still last.
    assert [n for n, _ in committed_files(hub.route("commit")[-1])][-1] == "README.md"


def test_hub_publisher_gives_up_after_retries(hub: FakeHubState, model_folder: Path) -> None:
    hub.failures = {"commit": [(503, {})] * 3}
    with pytest.raises(HubUnavailableError) as info:
        publisher(hub).publish(model_folder, job_id="j", destination=HubDestination("acme/tiny"))
    assert info.value.retryable and len(hub.route("commit")) == 3


def test_hub_publisher_maps_auth_errors(hub: FakeHubState, model_folder: Path) -> None:
    hub.failures = {"create_repo": [(403, {})], "repo_info": [(403, {})]}
    with pytest.raises(HubAuthError, match="cannot write to acme/tiny"):
        publisher(hub).publish(model_folder, job_id="j", destination=HubDestination("acme/tiny"))
    assert not hub.route("commit")


def test_token_only_in_authorization_header_and_never_logged(
    hub: FakeHubState, model_folder: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install_redaction()
    # huggingface_hub's debug mode logs each request as a curl command; make it as loud as it gets.
    monkeypatch.setattr(constants, "HF_DEBUG", True)
    hub.failures = {"commit": [(503, {})]}
    with caplog.at_level(logging.DEBUG):
        publisher(hub).publish(model_folder, job_id="job-10",
                               destination=HubDestination("acme/tiny"))
    assert hub.requests
    for rec in hub.requests:
        assert rec.headers.get("authorization") == f"Bearer {TOKEN}"
        others = {k: v for k, v in rec.headers.items() if k.lower() != "authorization"}
        assert TOKEN not in repr(others)
        assert TOKEN not in rec.path and TOKEN not in repr(rec.query)
        assert TOKEN.encode() not in rec.body
    assert caplog.records and TOKEN not in caplog.text


def test_missing_token_is_refused() -> None:
    with pytest.raises(HubAuthError, match="PUT /v1/hub-token"):
        HubPublisher(token="")


LIVE_TOKEN = os.environ.get("SLIMGPT_LIVE_HUB_TOKEN")
LIVE_ENDPOINT = os.environ.get("SLIMGPT_LIVE_HUB_ENDPOINT")


@pytest.mark.skipif(
    not (LIVE_TOKEN and LIVE_ENDPOINT),
    reason="live Hub test: set SLIMGPT_LIVE_HUB_TOKEN and SLIMGPT_LIVE_HUB_ENDPOINT to run it",
)
def test_live_hub_publish(model_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert LIVE_TOKEN and LIVE_ENDPOINT
    api = HfApi(endpoint=LIVE_ENDPOINT, token=LIVE_TOKEN)
    namespace = os.environ.get("SLIMGPT_LIVE_HUB_NAMESPACE") or api.whoami()["name"]
    repo_id = f"{namespace}/slimgpt-live-test-{uuid.uuid4().hex[:8]}"
    try:
        result = HubPublisher(token=LIVE_TOKEN, endpoint=LIVE_ENDPOINT).publish(
            model_folder, job_id="live", destination=HubDestination(repo_id)
        )
        assert result.commit_sha and api.model_info(repo_id).private
        assert "README.md" in api.list_repo_files(repo_id)
    finally:
        api.delete_repo(repo_id, missing_ok=True)
