"""Load the model to prune: a Hub id (with revision), a local Hugging Face folder, or a GGUF file.

Every path returns a plain transformers model (one that ``save_pretrained`` accepts), its
tokenizer, and ``source_info`` (base id, resolved revision, licence when known) for the
export's provenance. Only model types with a family adapter (:mod:`slimgpt_core.families`) are
accepted, with an error that lists them otherwise.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from slimgpt_core.families import UnsupportedFamilyError, family_for_config, supported_model_types

SUPPORTED_MODEL_TYPES: tuple[str, ...] = supported_model_types()


class UnsupportedModelError(ValueError):
    """The model's family has no adapter here, so SlimGPT cannot prune and export it."""


def _check_model_type(config: Any, ref: str) -> None:
    try:
        family_for_config(config)
    except UnsupportedFamilyError:
        model_type = getattr(config, "model_type", None)
        archs = getattr(config, "architectures", None) or []
        raise UnsupportedModelError(
            f"{ref}: model_type {model_type!r} ({', '.join(archs) or 'unknown architecture'}) "
            f"is not supported; SlimGPT here prunes these model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return "auto"
    if isinstance(dtype, str):
        if dtype == "auto":
            return dtype
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")  # noqa: TRY004 - a bad name, not a bad type
        return resolved
    return dtype


def _card_license(folder: Path) -> str | None:
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a malformed card must not stop the job
        return None


def _gguf_metadata(path: Path) -> dict[str, Any]:
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        out = {}
        for key in ("general.name", "general.organization", "general.license",
                    "general.basename", "general.size_label", "general.architecture"):
            field = reader.fields.get(key)
            if field is not None:
                with contextlib.suppress(Exception):  # a field the reader cannot decode
                    out[key] = field.contents()
        return out
    except Exception:  # noqa: BLE001 - metadata is informational; the loader reports real errors
        return {}


_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|F16|F32|BF16|f16|f32|bf16)$")


def _load_gguf(path: Path, dtype: Any, device: str | None) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    _check_model_type(config, str(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    load_dtype = torch.float32 if dtype == "auto" else dtype
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=load_dtype)
    # A GGUF-loaded model remembers its origin and refuses save_pretrained: copy its weights
    # into a plain model built from its config, so the pruned result can be exported.
    model = AutoModelForCausalLM.from_config(dequantized.config, dtype=load_dtype)
    missing, unexpected = model.load_state_dict(dequantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(model, "all_tied_weights_keys", {})]
    if missing or unexpected:
        raise RuntimeError(f"{path}: GGUF weights do not match the model built from its config "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    del dequantized
    meta = _gguf_metadata(path)
    stem = _QUANT_SUFFIX.sub("", path.stem)
    org = meta.get("general.organization")
    base_id = f"{org}/{stem}" if org and " " not in str(org) else stem
    info = {
        "kind": "gguf", "ref": str(path), "base_model_id": base_id, "base_model_id_guessed": True,
        "revision": None, "license": meta.get("general.license"), "gguf_file": name,
        "gguf_name": meta.get("general.name"),
    }
    return model, tokenizer, info


def folder_source_info(folder: Path, revision: str | None = None,
                       hub_id: str | None = None) -> dict[str, Any]:
    """``source_info`` of a local folder (or of a Hub snapshot folder of ``hub_id``), read
    without loading any weights."""
    config = json.loads((folder / "config.json").read_text())
    if hub_id is not None:
        return {"kind": "hub", "ref": hub_id, "base_model_id": hub_id,
                "revision": folder.name if len(folder.name) == 40 else revision,
                "requested_revision": revision, "license": _card_license(folder)}
    return {"kind": "folder", "ref": str(folder),
            "base_model_id": config.get("_name_or_path") or folder.name,
            "revision": revision, "license": _card_license(folder)}


def load_base_model(
    ref: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    token: str | bool | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``ref`` (Hub id, local HF folder or ``.gguf`` file) for pruning.

    Returns ``(model, tokenizer, source_info)``; ``source_info`` has ``kind`` (hub | folder |
    gguf), ``base_model_id``, ``revision`` (the resolved commit for Hub models when known) and
    ``license`` (None when unknown). ``dtype``: a torch dtype or its name; default ``"auto"``
    (the checkpoint's own; fp32 for GGUF, which is dequantized). Raises
    :class:`UnsupportedModelError` for model types without a family adapter.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    load_dtype = _resolve_dtype(dtype)
    path = Path(ref).expanduser()
    if ref.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {ref} does not exist")
        model, tokenizer, info = _load_gguf(path, load_dtype, device)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{ref} is a folder without config.json (not a HF model)")
        config = AutoConfig.from_pretrained(path)
        _check_model_type(config, ref)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        info = {"kind": "folder", "ref": str(path),
                "base_model_id": getattr(config, "_name_or_path", None) or path.name,
                "revision": revision, "license": _card_license(path)}
    else:
        hub = {"revision": revision, "token": token}
        config = AutoConfig.from_pretrained(ref, **hub)
        _check_model_type(config, ref)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=load_dtype, **hub)
        tokenizer = AutoTokenizer.from_pretrained(ref, **hub)
        license = None
        try:
            from huggingface_hub import ModelCard

            license = ModelCard.load(ref, token=token).data.to_dict().get("license")
        except Exception:  # noqa: BLE001, S110 - offline or no card: unknown licence
            pass
        info = {"kind": "hub", "ref": ref, "base_model_id": ref,
                "revision": getattr(config, "_commit_hash", None) or revision,
                "requested_revision": revision, "license": license}
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer, info
