"""The model families SlimGPT prunes, one adapter module each (torch-free at import).

Every module in this package whose name does not start with ``_`` defines ``FAMILY``, an
instance of :class:`~slimgpt_core.families._base.Family`; adding a family is adding a module
(and its test). The API's estimate and the worker's early model check use this registry
without importing torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from slimgpt_core.families._base import Family, Layout

__all__ = [
    "Family",
    "Layout",
    "UnsupportedFamilyError",
    "all_families",
    "family_for_config",
    "family_for_gguf",
    "family_for_model_type",
    "supported_model_types",
]

#: Prefix of the ``model_type`` of a ``hetero`` export (``slimgpt_<base model_type>``).
HETERO_PREFIX = "slimgpt_"


class UnsupportedFamilyError(ValueError):
    """The model's family has no adapter here."""


_REGISTRY: dict[str, Family] | None = None


def _registry() -> dict[str, Family]:
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, Family] = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            family = getattr(module, "FAMILY", None)
            if not isinstance(family, Family):
                raise TypeError(f"{module.__name__} defines no FAMILY adapter")
            for model_type in family.model_types:
                if model_type in found:
                    raise TypeError(f"model_type {model_type!r} claimed by both "
                                    f"{found[model_type].name} and {family.name}")
                found[model_type] = family
        _REGISTRY = found
    return _REGISTRY


def all_families() -> list[Family]:
    """Every registered family, once each, by name."""
    return sorted({id(f): f for f in _registry().values()}.values(), key=lambda f: f.name)


def supported_model_types() -> tuple[str, ...]:
    """The ``config.json`` model types that can be pruned, sorted."""
    return tuple(sorted(_registry()))


def _unsupported(model_type: object, what: str) -> UnsupportedFamilyError:
    return UnsupportedFamilyError(
        f"{what} {model_type!r} is not supported; SlimGPT here prunes these model types: "
        + ", ".join(supported_model_types())
    )


def family_for_model_type(model_type: object, *, allow_hetero: bool = False) -> Family:
    """The adapter for ``model_type``; with ``allow_hetero`` also for ``slimgpt_<type>``."""
    if isinstance(model_type, str):
        key = model_type
        if allow_hetero and key.startswith(HETERO_PREFIX):
            key = key.removeprefix(HETERO_PREFIX)
        family = _registry().get(key)
        if family is not None:
            return family
    raise _unsupported(model_type, "model_type")


def family_for_config(config: Mapping[str, Any] | Any, *, allow_hetero: bool = False) -> Family:
    """The adapter for a ``config.json`` dict or a transformers config object."""
    model_type = (config.get("model_type") if isinstance(config, Mapping)
                  else getattr(config, "model_type", None))
    return family_for_model_type(model_type, allow_hetero=allow_hetero)


def family_for_gguf(architecture: object) -> Family:
    """The adapter for a GGUF file's ``general.architecture``."""
    for family in all_families():
        if architecture in family.gguf_architectures:
            return family
    supported = sorted(a for f in all_families() for a in f.gguf_architectures)
    raise UnsupportedFamilyError(
        f"GGUF architecture {architecture!r} is not supported; SlimGPT here prunes GGUF files "
        f"of these architectures: {', '.join(supported)}"
    )
