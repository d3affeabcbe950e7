"""What every family plugin shares: plan the served layout, build each layer with its widths,
rewrite the checkpoint's tensors into that layout while vLLM loads them.

A family plugin is a decoder-layer subclass of vLLM's own layer for that family (it calls
:func:`served_layer` with its prefix and hands the base layer a :class:`LayerConfigView`) and a
model subclass of vLLM's own model for the family with :class:`SlimGPTModelMixin` first, which
validates the config, plans the layout and rewrites weights. vLLM's models build their layers
from a name they look up at build time (a module global or a class attribute, depending on the
family); :func:`layers_built_as` points that name at the SlimGPT layer while the model builds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.utils import extract_layer_index

from slimgpt_core.served_layout import (
    LayerLayout,
    layer_widths_from_config,
    plan_layer,
    plan_model,
    summarize,
)
from slimgpt_core.served_weights import rewrite_weights
from slimgpt_vllm.layer_config import (
    LayerConfigView,
    check_servable,
    head_dim_of,
    width_overrides,
)

# A child of vLLM's logger, so the line shows in vLLM's log with its format and level.
logger = logging.getLogger("vllm.slimgpt")

__all__ = ["SlimGPTModelMixin", "layers_built_as", "served_layer", "served_view"]


def served_layer(config: Any, prefix: str) -> LayerLayout:
    """The served layout of the layer vLLM builds under ``prefix`` (``model.layers.<i>``)."""
    index = extract_layer_index(prefix)
    return plan_layer(layer_widths_from_config(config)[index],
                      get_tensor_model_parallel_world_size())


def served_view(config: Any, prefix: str) -> tuple[LayerConfigView, LayerLayout]:
    """The config view (served widths only) and layout of the layer built under ``prefix``."""
    layout = served_layer(config, prefix)
    return LayerConfigView(config, **width_overrides(config, layout)), layout


@contextmanager
def layers_built_as(owner: Any, name: str, layer_cls: type) -> Iterator[None]:
    """``owner.name`` (the layer class a vLLM model builds from) is ``layer_cls`` meanwhile.

    Model construction runs once per process before any request, in one thread.
    """
    original = getattr(owner, name)
    setattr(owner, name, layer_cls)
    try:
        yield
    finally:
        setattr(owner, name, original)


class SlimGPTModelMixin:
    """First base of each family's SlimGPT model class (before vLLM's model class)."""

    #: ``base_model_type`` values (``slimgpt_<base>`` configs) the family class serves.
    slimgpt_bases: ClassVar[tuple[str, ...]] = ()
    #: The ``slimgpt_layout`` the family's layers are built for.
    slimgpt_layout: ClassVar[Mapping[str, str]] = {}

    def _plan_served_layout(self, vllm_config: VllmConfig) -> list[LayerLayout]:
        """Validate the config and plan every layer, before vLLM builds anything."""
        config = vllm_config.model_config.hf_config
        check_servable(config, type(self).__name__, self.slimgpt_bases, self.slimgpt_layout)
        return plan_model(config, get_tensor_model_parallel_world_size())

    def _record_served_layout(self, config: Any, layouts: list[LayerLayout]) -> None:
        self.slimgpt_layouts = layouts
        self.slimgpt_head_dim = head_dim_of(config)
        stats = summarize(layouts)
        logger.info(
            "SlimGPT hetero model (%s): %d layers, %d served as pruned, padding adds %d zero "
            "query heads, %d KV-head copies and %d zero FFN channels (tensor parallel %d)",
            config.model_type, stats["layers"], stats["identity_layers"],
            stats["zero_query_heads"], stats["kv_replicas"], stats["zero_ffn_channels"],
            get_tensor_model_parallel_world_size())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(  # type: ignore[misc]
            rewrite_weights(weights, self.slimgpt_layouts, self.slimgpt_head_dim))
