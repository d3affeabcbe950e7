"""Resolve a job's model reference to local files, pinned to a commit.

A reference is a Hub repo id (``org/name``), a folder under the local-models root, or a
``.gguf`` file under that root. Unsupported models fail here, before anything large is
downloaded or a GPU is touched.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from slimgpt_core.families import (
    UnsupportedFamilyError,
    family_for_gguf,
    family_for_model_type,
    supported_model_types,
)
from slimgpt_core.schedule import PlanError
from worker.errors import (
    ModelSourceError,
    UnsupportedModelError,
    WorkerError,
    call_hub_with_retries,
    hub_error_to_worker_error,
)
from worker.retry import RetryPolicy
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

#: ``config.json`` model types with a family adapter in slimgpt_core (torch-free registry).
SUPPORTED_MODEL_TYPES = frozenset(supported_model_types())
#: Everything a pruning job needs from a model repo, and nothing pickled.
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

SnapshotDownload = Callable[..., str]
ModelInfo = Callable[..., Any]


@dataclass(frozen=True)
class ResolvedModel:
    """Local files of a model and what they were resolved from.

    ``path`` is a folder for ``hub``/``local`` and the ``.gguf`` file for ``gguf``;
    ``revision`` is the Hub commit SHA to record on the job (None for local models).
    """

    path: Path
    kind: Literal["hub", "local", "gguf"]
    model_type: str
    repo_id: str | None = None
    revision: str | None = None


def check_model_type(model_type: object, *, what: str) -> str:
    try:
        family_for_model_type(model_type)
    except UnsupportedFamilyError as exc:
        raise UnsupportedModelError(f"{what}: {exc}") from None
    assert isinstance(model_type, str)
    return model_type


def read_model_type(config_path: Path, *, what: str) -> str:
    """Validated ``model_type`` from a ``config.json``."""
    if not config_path.is_file():
        raise UnsupportedModelError(f"{what} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{what}: config.json is not valid JSON ({exc})") from exc
    model_type = check_model_type(config.get("model_type") if isinstance(config, dict) else None,
                                  what=what)
    try:  # a variant the family's adapter refuses (e.g. Qwen3-MoE with dense layers)
        family_for_model_type(model_type).check_supported(config)
    except PlanError as exc:
        raise UnsupportedModelError(f"{what}: {exc}") from None
    return model_type


def check_weight_files(names: Iterable[str], *, what: str) -> None:
    """Refuse a model with no safetensors weights (pickles execute code when loaded)."""
    names = list(names)
    if any(n.endswith(".safetensors") for n in names):
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise UnsupportedModelError(
            f"{what} ships its weights only as pickles (.bin/.pt); SlimGPT loads safetensors "
            "only. Convert the model to safetensors or pick a repo that has them"
        )
    raise UnsupportedModelError(f"{what} has no .safetensors weight files")


def gguf_model_type(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file, validated like ``model_type``."""
    from gguf import GGUFReader  # memory-maps the file; only the header is read

    try:
        field = GGUFReader(path).get_field("general.architecture")
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{path.name} is not a readable GGUF file ({exc})") from exc
    arch = field.contents() if field is not None else None
    try:
        family_for_gguf(arch)
    except UnsupportedFamilyError as exc:
        raise UnsupportedModelError(f"{path.name}: {exc}") from None
    return str(arch)


class ModelSource:
    """Resolves model references for one worker; the Hub functions are injectable for tests."""

    def __init__(
        self,
        *,
        local_models_dir: Path | None = None,
        cache_dir: Path | None = None,
        endpoint: str | None = None,
        retry_policy: RetryPolicy | None = None,
        snapshot_download_fn: SnapshotDownload = snapshot_download,
        model_info_fn: ModelInfo | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.local_models_dir = local_models_dir
        self.cache_dir = cache_dir
        self.endpoint = endpoint
        self.retry_policy = retry_policy or RetryPolicy()
        self._snapshot_download = snapshot_download_fn
        self._model_info = model_info_fn or HfApi(endpoint=endpoint).model_info
        self._sleep = sleep

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> ModelSource:
        return cls(
            local_models_dir=settings.local_models_dir,
            cache_dir=settings.hf_cache_dir,
            endpoint=settings.hub_endpoint,
            retry_policy=settings.hub_retry_policy(),
        )

    def resolve(
        self, ref: str, *, revision: str | None = None, token: str | None = None
    ) -> ResolvedModel:
        """Local files for ``ref``; Hub downloads are pinned to the commit ``revision`` names."""
        ref = ref.strip()
        if not ref:
            raise ModelSourceError("the model reference is empty")
        local = self._local_candidate(ref)
        if local is not None:
            return self._resolve_local(local)
        if ref.endswith(".gguf") or ref.startswith(("/", ".", "~")):
            if self.local_models_dir is None:
                raise ModelSourceError(
                    f"{ref!r} is a local path, but local models are disabled "
                    "(set SLIMGPT_LOCAL_MODELS_DIR)"
                )
            raise ModelSourceError(f"{ref!r} was not found under the local-models root")
        return self._resolve_hub(ref, revision=revision, token=token)

    # local ------------------------------------------------------------------------------------

    def _local_candidate(self, ref: str) -> Path | None:
        if self.local_models_dir is None:
            return None
        root = self.local_models_dir.expanduser().resolve()
        raw = Path(ref).expanduser()
        candidate = (raw if raw.is_absolute() else root / raw).resolve()
        # resolve() follows symlinks, so a link inside the root that points outside is refused.
        if not candidate.is_relative_to(root):
            if raw.is_absolute() or ".." in raw.parts:
                raise ModelSourceError(f"{ref!r} is outside the local-models root")
            return None
        return candidate if candidate.exists() else None

    def _resolve_local(self, path: Path) -> ResolvedModel:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelSourceError(f"{path.name}: a local model is a folder or a .gguf file")
            return ResolvedModel(path=path, kind="gguf", model_type=gguf_model_type(path))
        what = f"local model {path.name}"
        model_type = read_model_type(path / "config.json", what=what)
        check_weight_files((p.name for p in path.iterdir()), what=what)
        return ResolvedModel(path=path, kind="local", model_type=model_type)

    # hub --------------------------------------------------------------------------------------

    def _resolve_hub(self, repo_id: str, *, revision: str | None, token: str | None) -> ResolvedModel:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise ModelSourceError(f"{repo_id!r} is not a valid Hub repo id: {exc}") from exc
        # False, not None: None would make huggingface_hub fall back to the worker machine's own
        # token, letting a tenant download what only the operator may see.
        auth: str | bool = token or False
        what = repo_id if revision is None else f"{repo_id}@{revision}"

        def hub(fn: Callable[[], Any], action: str) -> Any:
            try:
                return call_hub_with_retries(fn, policy=self.retry_policy, sleep=self._sleep,
                                             what=f"{action} {what}")
            except WorkerError:
                raise
            except Exception as exc:
                mapped = hub_error_to_worker_error(
                    exc, repo_id=repo_id, revision=revision, has_token=bool(token)
                )
                if mapped is None:
                    raise
                raise mapped from exc

        sha = revision
        if not constants.is_offline_mode():
            # Ask the Hub first: it pins the commit and tells us about pickle-only repos before
            # a single byte of weights is downloaded.
            info = hub(
                lambda: self._model_info(repo_id, revision=revision, token=auth,
                                         files_metadata=False),
                "looking up",
            )
            sha = getattr(info, "sha", None) or revision
            siblings = [getattr(s, "rfilename", "") for s in getattr(info, "siblings", None) or []]
            if siblings:
                check_weight_files(siblings, what=repo_id)

        def download(patterns: list[str]) -> Path:
            return Path(
                hub(
                    lambda: self._snapshot_download(
                        repo_id,
                        revision=sha,
                        token=auth,
                        cache_dir=self.cache_dir,
                        allow_patterns=patterns,
                        endpoint=self.endpoint,
                    ),
                    "downloading",
                )
            )

        # config.json alone first: a BERT or a Mixtral is refused after kilobytes, not gigabytes.
        folder = download(["config.json"])
        model_type = read_model_type(folder / "config.json", what=repo_id)
        folder = download(ALLOW_PATTERNS)
        check_weight_files((p.name for p in folder.iterdir()), what=repo_id)
        resolved_sha = folder.name if _looks_like_sha(folder.name) else sha
        logger.info("resolved %s to %s at %s", repo_id, resolved_sha, folder)
        return ResolvedModel(
            path=folder, kind="hub", model_type=model_type, repo_id=repo_id,
            revision=resolved_sha,
        )


def _looks_like_sha(name: str) -> bool:
    # Hub snapshots live in .../snapshots/<40-hex commit>; that name is the pinned revision.
    return len(name) == 40 and all(c in "0123456789abcdef" for c in name)


def resolve_model(
    ref: str, *, revision: str | None = None, token: str | None = None,
    settings: WorkerSettings | None = None,
) -> ResolvedModel:
    """Convenience wrapper: :meth:`ModelSource.resolve` with settings from the environment."""
    return ModelSource.from_settings(settings or WorkerSettings()).resolve(
        ref, revision=revision, token=token
    )


__all__ = [
    "ALLOW_PATTERNS",
    "SUPPORTED_MODEL_TYPES",
    "ModelSource",
    "ResolvedModel",
    "resolve_model",
]
