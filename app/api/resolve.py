"""Where a `model_id` points: a Hub repo, or a folder or `.gguf` file under SLIMGPT_LOCAL_MODELS_DIR."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from fastapi import HTTPException

from app.core.config import Settings
from app.schemas import is_hub_repo_id


def _unprocessable(field: str, msg: str) -> HTTPException:
    return HTTPException(422, detail=f"{field}: {msg}")


def resolve_model(settings: Settings, model_id: str, field: str = "model_id") -> tuple[str, Path | None]:
    """``("local", absolute folder)`` or ``("hub", None)``; 422 for anything else.

    A local folder is looked up first (relative to the root, symlinks resolved, and it must stay
    inside the root); otherwise the value must have Hub repo id syntax.
    """
    if "\x00" in model_id or "\\" in model_id:
        raise _unprocessable(field, "contains characters not allowed in a model id or path")
    pure = PurePosixPath(model_id)
    if pure.is_absolute() or model_id.startswith("~"):
        raise _unprocessable(
            field, "absolute paths are not accepted; give a folder relative to the local "
            "models root (SLIMGPT_LOCAL_MODELS_DIR) or a Hub repo id `owner/name`")
    if ".." in pure.parts:
        raise _unprocessable(field, "path escapes the local models root (SLIMGPT_LOCAL_MODELS_DIR)")
    root_setting = settings.local_models_dir
    if root_setting is not None:
        root = Path(root_setting).resolve()
        try:
            candidate = (root / model_id).resolve()
            exists = candidate.exists()
        except (OSError, ValueError):
            # A name longer than the filesystem allows, or one it cannot encode (a lone
            # surrogate): not a local model.
            exists = False
        if exists:
            if candidate != root and root not in candidate.parents:
                raise _unprocessable(
                    field, "path escapes the local models root (SLIMGPT_LOCAL_MODELS_DIR)")
            if candidate.is_file() and candidate.suffix == ".gguf":
                return "local", candidate
            if not candidate.is_dir():
                raise _unprocessable(field, "a local model must be a folder or a .gguf file")
            if candidate == root:
                raise _unprocessable(field, "name a model folder inside the local models root")
            return "local", candidate
    if is_hub_repo_id(model_id):
        return "hub", None
    raise _unprocessable(
        field, f"{model_id!r} is neither a valid Hub repo id (`owner/name`) nor a folder under "
        "the local models root")


def check_local_family(path: Path, field: str = "model_id") -> str:
    """The family name of a local model; 422 naming the supported model types otherwise.

    Hub models are checked by the worker as soon as it has their config.json (kilobytes, before
    any weights): the API does not download from the Hub.
    """
    from slimgpt_core.model_type import ModelTypeError, local_model_family

    try:
        return local_model_family(path).name
    except (ModelTypeError, ValueError) as err:  # UnsupportedFamilyError is a ValueError
        raise _unprocessable(field, str(err)) from None
