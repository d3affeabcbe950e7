from __future__ import annotations

import errno

import httpx2
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from pydantic import ValidationError

from worker.errors import (
    GATED_MESSAGE,
    GatedModelError,
    HubUnavailableError,
    JobCancelled,
    describe_exception,
    hub_error_to_worker_error,
    is_transient_hub_error,
    retry_after_s,
)
from worker.retry import RetryPolicy, call_with_retries
from worker.settings import WorkerSettings


def hub_error(cls: type[HfHubHTTPError], status: int, headers: dict[str, str] | None = None):
    request = httpx2.Request("GET", "https://hub.test/api/models/a/b")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    return cls(f"{status} error", response=response)


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    s = WorkerSettings()
    assert s.job_soft_time_limit_s == 6 * 3600
    assert s.visibility_s > s.hard_limit_s > s.job_soft_time_limit_s
    monkeypatch.setenv("SLIMGPT_BROKER_URL", "redis://example:6379/3")
    monkeypatch.setenv("SLIMGPT_QUEUE", "gpu-80g")
    monkeypatch.setenv("SLIMGPT_JOB_SOFT_TIME_LIMIT_S", "100")
    s = WorkerSettings()
    assert (s.broker_url, s.queue) == ("redis://example:6379/3", "gpu-80g")
    assert s.hard_limit_s == 1900 and s.visibility_s == 5500


def test_settings_reject_visibility_shorter_than_hard_limit() -> None:
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT"):
        WorkerSettings(job_soft_time_limit_s=10, job_hard_time_limit_s=20, visibility_timeout_s=20)
    with pytest.raises(ValidationError, match="HARD_TIME_LIMIT"):
        WorkerSettings(job_soft_time_limit_s=10, job_hard_time_limit_s=10)


def test_retry_policy_backoff_and_retry_after() -> None:
    policy = RetryPolicy(max_attempts=4, base_delay_s=1, max_delay_s=5)
    assert [policy.delay_s(a) for a in (1, 2, 3, 4)] == [1, 2, 4, 5]
    assert policy.delay_s(1, retry_after_s=3) == 3
    assert policy.delay_s(1, retry_after_s=3600) == 5


def test_call_with_retries_stops_on_permanent_errors() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    policy = RetryPolicy(max_attempts=5, base_delay_s=0.5)
    assert call_with_retries(flaky, policy=policy, is_retryable=is_transient_hub_error,
                             sleep=sleeps.append) == "ok"
    assert sleeps == [0.5, 1.0]

    def broken() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError):
        call_with_retries(broken, policy=policy, is_retryable=is_transient_hub_error,
                          sleep=sleeps.append)
    assert sleeps == [0.5, 1.0]


def test_hub_error_classification() -> None:
    assert is_transient_hub_error(hub_error(HfHubHTTPError, 429))
    assert is_transient_hub_error(hub_error(HfHubHTTPError, 503))
    assert is_transient_hub_error(httpx2.ConnectError("refused"))
    assert not is_transient_hub_error(hub_error(HfHubHTTPError, 404))
    assert retry_after_s(hub_error(HfHubHTTPError, 429, {"Retry-After": "7"})) == 7.0
    gated = hub_error_to_worker_error(
        hub_error(GatedRepoError, 401), repo_id="meta-llama/x", has_token=False
    )
    assert isinstance(gated, GatedModelError) and GATED_MESSAGE in gated.message
    # The Hub hides private repos behind 401 "not found"; without a token that reads as gated.
    hidden = hub_error_to_worker_error(
        hub_error(RepositoryNotFoundError, 401), repo_id="org/private", has_token=False
    )
    assert isinstance(hidden, GatedModelError)
    missing = hub_error_to_worker_error(
        hub_error(RepositoryNotFoundError, 404), repo_id="org/nope", has_token=True
    )
    assert missing is not None and missing.code == "model_not_found"
    busy = hub_error_to_worker_error(hub_error(HfHubHTTPError, 503), repo_id="a/b", has_token=True)
    assert isinstance(busy, HubUnavailableError) and busy.retryable


def test_describe_exception_covers_the_failures_users_see() -> None:
    code, message, retryable = describe_exception(torch.cuda.OutOfMemoryError("CUDA oom"))
    assert code == "gpu_out_of_memory" and "num_samples" in message and not retryable
    code, message, retryable = describe_exception(torch.linalg.LinAlgError("not PD"))
    assert code == "cholesky_failed" and "damping" in message and retryable
    code, message, _ = describe_exception(OSError(errno.ENOSPC, "No space left on device"))
    assert code == "disk_full"
    assert describe_exception(JobCancelled()).code == "cancelled"
    assert describe_exception(hub_error(HfHubHTTPError, 429)) == (
        "hub_unavailable", describe_exception(hub_error(HfHubHTTPError, 429)).message, True
    )
    assert describe_exception(GatedModelError("x")).code == "model_gated"
    code, message, retryable = describe_exception(RuntimeError("boom"))
    assert (code, message, retryable) == ("internal_error", "RuntimeError: boom", False)


def test_describe_exception_redacts_tokens() -> None:
    token = "hf_" + "a1B2" * 9
    desc = describe_exception(RuntimeError(f"auth failed with {token}"))
    assert token not in desc.message and "[REDACTED]" in desc.message



def test_non_finite_hessian_is_a_distinct_error_that_is_not_retried() -> None:
    from slimgpt_core.errors import NonFiniteHessianError

    code, message, retryable = describe_exception(
        NonFiniteHessianError("layer 4 mlp.down_proj", 12, 2_359_296))
    assert code == "non_finite_hessian" and not retryable
    assert message.startswith("layer 4 mlp.down_proj:") and "NaN or Inf" in message


def test_a_cache_miss_under_hf_hub_offline_is_hub_offline_not_internal_error(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    miss = LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
    code, message, retryable = describe_exception(miss)  # the conftest sets HF_HUB_OFFLINE
    assert code == "hub_offline" and "HF_HUB_OFFLINE" in message and not retryable
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    code, _, retryable = describe_exception(miss)  # online: the download failed, try again
    assert code == "hub_unavailable" and retryable


def test_a_dead_gpu_rank_is_a_named_retryable_error() -> None:
    from slimgpt_core.errors import RankFailed

    desc = describe_exception(RankFailed("helper rank 1 (pid 42) was killed by SIGKILL",
                                         rank=1, cause="was killed by SIGKILL"))
    assert desc.code == "gpu_rank_failed" and desc.retryable
    assert "rank 1" in desc.message and "SIGKILL" in desc.message
