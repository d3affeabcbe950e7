"""Publishing a finished model folder: to local artifacts (embedded default) or to the Hub.

Both publishers take the folder the exporter wrote and return where it ended up. Neither ever
publishes a pickle, and both are safe to call again for a redelivered job.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from huggingface_hub import CommitOperationAdd, HfApi

from worker.errors import (
    HubAuthError,
    HubUnavailableError,
    PublishError,
    call_hub_with_retries,
    http_status,
    is_transient_hub_error,
)
from worker.ids import is_valid_job_id
from worker.model_source import PICKLE_SUFFIXES
from worker.redact import register_secret
from worker.retry import RetryPolicy

logger = logging.getLogger(__name__)

MODEL_CARD = "README.md"


@dataclass(frozen=True)
class HubDestination:
    repo_id: str
    private: bool = True
    create_pr: bool = False


@dataclass(frozen=True)
class PublishResult:
    """``location``: where the model now is (file:// URI or Hub repo URL, or the PR's URL).

    ``url`` is the Hub commit URL and ``commit_sha`` its id; both None for local publishing.
    """

    location: str
    url: str | None = None
    commit_sha: str | None = None
    pr_url: str | None = None


class Publisher(Protocol):
    def publish(
        self, folder: Path, *, job_id: str, destination: HubDestination | None
    ) -> PublishResult: ...


def publishable_files(folder: Path) -> list[Path]:
    """Relative paths of every file to publish, the model card last.

    The card goes last so that a reader who sees the card also sees the weights it describes.
    """
    if not folder.is_dir():
        raise PublishError(f"nothing to publish: {folder} is not a folder")
    files: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise PublishError(f"refusing to publish a symlink: {path.relative_to(folder)}")
        if not path.is_file():
            continue
        rel = path.relative_to(folder)
        if path.suffix in PICKLE_SUFFIXES:
            raise PublishError(f"refusing to publish a pickle file: {rel}")
        files.append(rel)
    if not any(f.suffix == ".safetensors" for f in files):
        raise PublishError("the model folder has no .safetensors weights")
    files.sort(key=lambda rel: rel.as_posix() == MODEL_CARD)
    return files


class LocalPublisher:
    """Puts the folder at ``artifacts_dir/<job_id>/model``, all at once or not at all."""

    def __init__(self, artifacts_dir: Path, *, move: bool = False) -> None:
        self.artifacts_dir = artifacts_dir
        # Moving avoids copying gigabytes when the export folder is on the same disk.
        self.move = move

    def target(self, job_id: str) -> Path:
        if not is_valid_job_id(job_id):
            raise PublishError(f"not a valid job id: {job_id!r}")
        return self.artifacts_dir / job_id / "model"

    def publish(
        self, folder: Path, *, job_id: str, destination: HubDestination | None = None
    ) -> PublishResult:
        target = self.target(job_id)
        if target.is_dir():
            # A redelivered job that already published: keep the first result, never a second.
            logger.info("job %s already published at %s", job_id, target)
            return PublishResult(location=target.resolve().as_uri())
        publishable_files(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".model-staging-{uuid.uuid4().hex}"
        try:
            if self.move:
                shutil.move(str(folder), staging)
            else:
                shutil.copytree(folder, staging)
            # rename() of a directory is atomic: readers see no model or the whole model.
            os.rename(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and target.is_dir():
                return PublishResult(location=target.resolve().as_uri())
            raise
        logger.info("job %s published to %s", job_id, target)
        return PublishResult(location=target.resolve().as_uri())


class HubPublisher:
    """One commit with every file (card last) to a repo created private by default.

    Commits are retried on 429/5xx/network errors; a commit whose response was lost may then
    land twice (harmless for identical files; in PR mode it opens a second PR).
    """

    def __init__(
        self,
        *,
        token: str,
        endpoint: str | None = None,
        retry_policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        api: HfApi | None = None,
    ) -> None:
        if not token:
            raise HubAuthError("publishing to the Hub needs a Hub token: add one with PUT /v1/hub-token")
        register_secret(token)  # before any request can log it
        self._token = token
        self._api = api or HfApi(endpoint=endpoint, token=token)
        self.retry_policy = retry_policy or RetryPolicy()
        self._sleep = sleep

    def publish(
        self, folder: Path, *, job_id: str, destination: HubDestination | None
    ) -> PublishResult:
        if destination is None:
            raise PublishError("no Hub destination given (destination.hub_repo_id)")
        files = publishable_files(folder)
        repo_id = destination.repo_id

        repo_url = self._call(
            lambda: self._api.create_repo(
                repo_id, private=destination.private, exist_ok=True, repo_type="model",
                token=self._token,
            ),
            repo_id, "creating",
        )

        def commit() -> Any:
            # Fresh operations per attempt: huggingface_hub marks them used after a commit.
            operations = [
                CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=str(folder / rel))
                for rel in files
            ]
            return self._api.create_commit(
                repo_id,
                operations=operations,
                commit_message=f"SlimGPT pruned model (job {job_id})",
                commit_description=f"Published by the SlimGPT service for job {job_id}.",
                repo_type="model",
                create_pr=destination.create_pr,
                token=self._token,
            )

        info = self._call(commit, repo_id, "committing to")
        pr_url = getattr(info, "pr_url", None)
        logger.info("job %s published to %s (commit %s)", job_id, repo_id, info.oid)
        return PublishResult(
            location=pr_url or str(repo_url),
            url=info.commit_url,
            commit_sha=info.oid,
            pr_url=pr_url,
        )

    def _call(self, fn: Callable[[], Any], repo_id: str, action: str) -> Any:
        try:
            return call_hub_with_retries(fn, policy=self.retry_policy, sleep=self._sleep,
                                         what=f"{action} {repo_id}")
        except Exception as exc:
            status = http_status(exc)
            if status in (401, 403):
                raise HubAuthError(
                    f"the Hub token cannot write to {repo_id} (HTTP {status}): give it write "
                    "access to that namespace or update it with PUT /v1/hub-token"
                ) from exc
            if is_transient_hub_error(exc):
                raise HubUnavailableError(
                    f"the Hub kept failing while {action} {repo_id}; the job can be retried"
                ) from exc
            raise PublishError(
                f"publishing to {repo_id} failed while {action} it"
                + (f" (HTTP {status})" if status else f" ({type(exc).__name__})")
            ) from exc
