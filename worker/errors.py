"""Errors a user can act on, and the mapping from any exception to (code, message, retryable).

The runner stores ``code`` and ``message`` on the job row and uses ``retryable`` to decide
whether another attempt could succeed. Messages are redacted: a token never reaches a job row.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import ClassVar, NamedTuple, TypeVar

from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from slimgpt_core.errors import NonFiniteHessianError, RankFailed, SettingUnavailableError
from worker.redact import redact
from worker.retry import RetryPolicy, call_with_retries

T = TypeVar("T")

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http  # type: ignore[no-redef]

GATED_MESSAGE = (
    "this model is gated: add a Hub token with PUT /v1/hub-token and accept its license on the Hub"
)
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class WorkerError(Exception):
    """An error whose message is meant for the job's owner."""

    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class GatedModelError(WorkerError):
    code = "model_gated"


class HubAuthError(WorkerError):
    code = "hub_unauthorized"


class ModelNotFoundError(WorkerError):
    code = "model_not_found"


class ModelRevisionNotFoundError(WorkerError):
    code = "revision_not_found"


class UnsupportedModelError(WorkerError):
    code = "unsupported_model"


class ModelSourceError(WorkerError):
    """A model reference that is malformed, missing, or outside the allowed root."""

    code = "invalid_model_source"


class CalibrationSourceError(WorkerError):
    code = "invalid_calibration_source"


class EvaluationSourceError(WorkerError):
    code = "invalid_eval_source"


class HubUnavailableError(WorkerError):
    """Rate limits, 5xx and network errors that outlived the retries; a later attempt may work."""

    code = "hub_unavailable"
    retryable = True


class HubOfflineError(WorkerError):
    """HF_HUB_OFFLINE is set and what the job needs is not in the local Hub cache."""

    code = "hub_offline"


def hub_offline() -> bool:
    """Whether the Hub client runs in offline mode (``HF_HUB_OFFLINE``)."""
    return bool(hub_constants.is_offline_mode())


class HealUnavailableError(WorkerError):
    """The request asks for healing that this job's placement cannot do."""

    code = "heal_unavailable"


class ZeroShotUnavailableError(WorkerError):
    """Zero-shot tasks were asked for and this worker cannot run them (no `zeroshot` extra,
    an unknown task, a model streamed from its shards)."""

    code = "zero_shot_unavailable"


class PublishError(WorkerError):
    code = "publish_failed"


class JobCancelled(WorkerError):
    code = "cancelled"

    def __init__(self, message: str = "the job was cancelled") -> None:
        super().__init__(message)


class ErrorDescription(NamedTuple):
    code: str
    message: str
    retryable: bool


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a Hub error, if it carries a response."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_transient_hub_error(exc: BaseException) -> bool:
    """Worth retrying: rate limit, server error, or a network failure (not offline mode)."""
    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, HfHubHTTPError):
        return http_status(exc) in TRANSIENT_STATUS
    if isinstance(exc, LocalEntryNotFoundError):
        # Online, this means the download failed (network) and the cache had no copy.
        return not hub_offline()
    return isinstance(exc, (_http.TransportError, ConnectionError, TimeoutError))


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form only)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    value = headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: rare from the Hub, fall back to backoff
        return None


def hub_error_to_worker_error(
    exc: BaseException,
    *,
    repo_id: str,
    revision: str | None = None,
    has_token: bool,
    kind: str = "model",
) -> WorkerError | None:
    """Translate a huggingface_hub error about ``repo_id`` into a user-facing one, if known.

    ``kind`` ("model" or "dataset") only changes the wording.
    """
    status = http_status(exc)
    if isinstance(exc, GatedRepoError) or (status in (401, 403) and not has_token):
        if has_token:
            return GatedModelError(
                f"{repo_id} is gated and your Hub token has no access: accept its license on "
                "the Hub with the account that owns the token"
            )
        return GatedModelError(f"{repo_id}: {GATED_MESSAGE}")
    if isinstance(exc, RevisionNotFoundError):
        return ModelRevisionNotFoundError(f"revision {revision!r} of {repo_id} was not found")
    if isinstance(exc, RepositoryNotFoundError):
        # The Hub answers 401 for private repos it will not reveal, so "not found" may also
        # mean "no access".
        hint = "" if has_token else " (if it is private, add a Hub token with PUT /v1/hub-token)"
        return ModelNotFoundError(f"{kind} repository {repo_id} was not found on the Hub{hint}")
    if status in (401, 403):
        return HubAuthError(f"the Hub rejected the token for {repo_id} (HTTP {status})")
    if isinstance(exc, OfflineModeIsEnabled) or (
            isinstance(exc, LocalEntryNotFoundError) and hub_offline()):
        return HubOfflineError(
            f"{kind} {repo_id} is not in the local Hub cache and HF_HUB_OFFLINE is set, so it "
            "cannot be downloaded: unset HF_HUB_OFFLINE or fill the cache "
            "(SLIMGPT_HF_CACHE_DIR) first"
        )
    if is_transient_hub_error(exc):
        what = f"HTTP {status}" if status else type(exc).__name__
        return HubUnavailableError(f"the Hub is unavailable ({what}) for {repo_id}; try again later")
    return None


def _torch_error(exc: BaseException) -> ErrorDescription | None:
    # If torch was never imported, the exception cannot be one of its types; importing it here
    # would cost seconds in processes (tests, the API) that never touch it.
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return ErrorDescription(
            "gpu_out_of_memory",
            "the GPU ran out of memory: lower calibration.num_samples or calibration.seq_len, "
            "or submit the job to a queue with larger GPUs",
            False,
        )
    if isinstance(exc, torch.linalg.LinAlgError):
        return ErrorDescription(
            "cholesky_failed",
            "a layer's Hessian was not positive definite (Cholesky failed); the job is retried "
            "with more damping (pruning.percdamp)",
            True,
        )
    return None


def describe_exception(exc: BaseException) -> ErrorDescription:
    """(code, message, retryable) for any exception raised while running a job."""
    if isinstance(exc, WorkerError):
        return ErrorDescription(exc.code, redact(exc.message), exc.retryable)
    if isinstance(exc, NonFiniteHessianError):
        # Checked before the Cholesky failure below: more damping cannot fix a NaN, so a
        # retry would only repeat the same work.
        return ErrorDescription("non_finite_hessian", redact(str(exc)), False)
    if isinstance(exc, SettingUnavailableError):
        # The model's family, its placement, the GPU count or the GPU's memory rule the
        # setting out: every attempt would end the same way.
        return ErrorDescription("setting_unavailable", redact(
            f"{exc}; submit with pruning.preset {exc.fallback!r}"), False)
    if isinstance(exc, RankFailed):
        # A GPU process of a multi-GPU job died (OOM killer, a GPU fault, a crash): the others
        # were stopped and the finished layers are checkpointed, so another attempt resumes.
        return ErrorDescription("gpu_rank_failed", redact(
            f"{exc}; the job resumes from its last finished layer on the next attempt"), True)
    torch_error = _torch_error(exc)
    if torch_error is not None:
        return torch_error
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ErrorDescription(
            "disk_full",
            "the worker ran out of disk space (model cache or artifacts); free space or point "
            "SLIMGPT_HF_CACHE_DIR / SLIMGPT_ARTIFACTS_DIR at a larger volume",
            False,
        )
    if type(exc).__name__ == "SoftTimeLimitExceeded":  # celery's, without importing celery
        return ErrorDescription(
            "time_limit", "the job exceeded SLIMGPT_JOB_SOFT_TIME_LIMIT_S", False
        )
    if isinstance(exc, MemoryError):
        return ErrorDescription(
            "out_of_memory", "the worker ran out of host memory while running the job", False
        )
    if isinstance(exc, (HfHubHTTPError, OfflineModeIsEnabled, LocalEntryNotFoundError)) or \
            is_transient_hub_error(exc):
        repo = getattr(exc, "repo_id", None) or "the Hub repository"
        mapped = hub_error_to_worker_error(exc, repo_id=str(repo), has_token=True)
        if mapped is not None:
            return ErrorDescription(mapped.code, redact(mapped.message), mapped.retryable)
    return ErrorDescription("internal_error", redact(f"{type(exc).__name__}: {exc}"), False)


def call_hub_with_retries(fn: Callable[[], T], *, policy: RetryPolicy, what: str,
                          sleep: Callable[[float], None]) -> T:
    """Call the Hub, retrying what :func:`is_transient_hub_error` calls transient (429 with
    its Retry-After, 5xx, connection errors); every Hub client in the worker goes through here."""
    return call_with_retries(fn, policy=policy, is_retryable=is_transient_hub_error,
                             retry_after_s=retry_after_s, what=what, sleep=sleep)
