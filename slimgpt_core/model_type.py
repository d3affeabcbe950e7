"""What family a model on disk is, without torch or transformers (for the API's submission check).

A Hugging Face folder says it in ``config.json`` (``model_type``); a GGUF file in its header
(``general.architecture``), which is read here with the standard library only: the API image
has neither torch nor the ``gguf`` package.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

from slimgpt_core.families import Family, family_for_gguf, family_for_model_type

__all__ = ["ModelTypeError", "gguf_architecture", "local_model_family"]

_GGUF_MAGIC = b"GGUF"
# GGUF value types: fixed sizes in bytes; 8 = string, 9 = array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_KEYS = 100_000
_MAX_CONFIG_BYTES = 4 * 1024 * 1024


class ModelTypeError(ValueError):
    """The file does not say what model it holds (unreadable config or GGUF header)."""


def _read(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise ModelTypeError("the GGUF header ends early")
    return data


def _u32(fh: BinaryIO) -> int:
    return int(struct.unpack("<I", _read(fh, 4))[0])


def _u64(fh: BinaryIO) -> int:
    return int(struct.unpack("<Q", _read(fh, 8))[0])


def _string(fh: BinaryIO) -> str:
    n = _u64(fh)
    if n > 1 << 20:
        raise ModelTypeError("a GGUF header string is implausibly long")
    return _read(fh, n).decode("utf-8", errors="replace")


def _skip(fh: BinaryIO, vtype: int) -> None:
    if vtype in _FIXED:
        fh.seek(_FIXED[vtype], 1)
    elif vtype == _STRING:
        fh.seek(_u64(fh), 1)
    elif vtype == _ARRAY:
        item, count = _u32(fh), _u64(fh)
        if item in _FIXED:
            fh.seek(_FIXED[item] * count, 1)
        else:
            for _ in range(count):
                _skip(fh, item)
    else:
        raise ModelTypeError(f"unknown GGUF value type {vtype}")


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` from the header of the GGUF file at ``path``."""
    with open(path, "rb") as fh:
        if fh.read(4) != _GGUF_MAGIC:
            raise ModelTypeError(f"{Path(path).name} is not a GGUF file")
        version = _u32(fh)
        if version < 2:
            raise ModelTypeError(f"{Path(path).name}: GGUF version {version} is too old")
        _u64(fh)  # tensor count
        keys = _u64(fh)
        for _ in range(min(keys, _MAX_KEYS)):
            key = _string(fh)
            vtype = _u32(fh)
            if key == "general.architecture" and vtype == _STRING:
                return _string(fh)
            _skip(fh, vtype)
    raise ModelTypeError(f"{Path(path).name} has no general.architecture in its header")


def local_model_family(path: str | Path) -> Family:
    """The family of a local model folder (``config.json``) or ``.gguf`` file.

    Raises :class:`~slimgpt_core.families.UnsupportedFamilyError` (a ValueError naming the
    supported model types) or :class:`ModelTypeError`.
    """
    path = Path(path)
    if path.is_file():
        return family_for_gguf(gguf_architecture(path))
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelTypeError(f"{path.name} has no config.json")
    if config_path.stat().st_size > _MAX_CONFIG_BYTES:
        raise ModelTypeError(f"{path.name}: config.json is too large to be a model config")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelTypeError(f"{path.name}: config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelTypeError(f"{path.name}: config.json is not a JSON object")
    return family_for_model_type(config.get("model_type"))
