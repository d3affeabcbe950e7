"""What one served layer of a SlimGPT ``hetero`` checkpoint is built from: a config view.

vLLM's decoder layers read their widths from the model config (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, ``head_dim``). Each SlimGPT layer subclass hands
its vLLM base layer a view of the config with that layer's served widths (the padded layout of
:mod:`slimgpt_core.served_layout`) and, where a family needs them, a few switches; every other
setting (rotary base, norms' epsilon, soft-capping, multipliers, sliding windows) is the shared
config's.

No vLLM and no torch here: the family plugins import this, and the main test suite tests it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from slimgpt_core.served_layout import LayerLayout, LayoutError, base_model_type

__all__ = ["PLAIN_LAYOUT", "LayerConfigView", "check_servable", "head_dim_of", "layout",
           "width_overrides"]


def layout(qkv: str = "separate", head_norm: str = "none", ffn: str = "gated"
           ) -> Mapping[str, str]:
    """A ``slimgpt_layout`` (docs/HETERO_FORMAT.md) that a family's layers are built for."""
    return MappingProxyType({"qkv": qkv, "head_norm": head_norm, "ffn": ffn})


#: The Llama layout; also what a checkpoint without ``slimgpt_layout`` has.
PLAIN_LAYOUT = layout()


class LayerConfigView:
    """The model config as one layer sees it: the layer's widths over the shared settings."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        self.__dict__["_base"] = base
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_base"], name)


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None)
               or config.hidden_size // config.num_attention_heads)


def width_overrides(config: Any, layout: LayerLayout) -> dict[str, Any]:
    """The config keys a vLLM decoder layer reads its widths from, for one served layer."""
    return {
        "num_attention_heads": layout.num_heads,
        "num_key_value_heads": layout.num_kv_heads,
        "intermediate_size": layout.intermediate_size,
        "head_dim": head_dim_of(config),
    }


def check_servable(config: Any, plugin: str, bases: tuple[str, ...],
                   layout: Mapping[str, str]) -> None:
    """Refuse a checkpoint that ``plugin`` (serving model types ``bases`` with ``slimgpt_layout``
    ``layout``) would build wrong, before anything is built."""
    base = base_model_type(config)
    if base not in bases:
        raise LayoutError(f"{plugin} serves {', '.join('slimgpt_' + b for b in bases)} "
                          f"checkpoints, not model_type {config.model_type!r}")
    found = {**PLAIN_LAYOUT, **dict(getattr(config, "slimgpt_layout", None) or {})}
    wrong = {k: found[k] for k, v in layout.items() if found[k] != v}
    if wrong:
        expected = ", ".join(f"{k}={v}" for k, v in layout.items())
        raise LayoutError(f"{plugin} serves slimgpt_layout {expected}; this "
                          f"{config.model_type} checkpoint has {wrong}")
