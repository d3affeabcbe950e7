"""SlimGPT ``hetero`` checkpoints as a vLLM model, built from vLLM's own Llama layers.

Every decoder layer is vLLM's ``LlamaDecoderLayer`` (``QKVParallelLinear``, paged ``Attention``,
``MergedColumnParallelLinear``/``RowParallelLinear``, fused RMSNorm, rotary embedding), given
the widths of its pruned layer through a per-layer view of the config. So the KV cache is paged
per layer with that layer's KV heads, the model compiles and captures CUDA graphs like vLLM's
Llama, and tensor parallelism splits each layer like any Llama layer. Layers whose widths do not
fit vLLM's grouped layout or the tensor-parallel split are served through the exact padded layout
of :mod:`slimgpt_core.served_layout` (zero heads, KV copies, zero channels), rewritten while loading.

Families: ``slimgpt_llama``, ``slimgpt_mistral`` and ``slimgpt_qwen2`` (Qwen2's q/k/v biases via
the Llama layer's ``qkv_bias`` switch; a sliding window becomes the layers' ``layer_types``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from slimgpt_core.served_layout import (
    LayerLayout,
    LayoutError,
    base_model_type,
    layer_widths_from_config,
    plan_layer,
    plan_model,
    summarize,
)
from slimgpt_core.served_weights import rewrite_weights

# A child of vLLM's logger, so the line shows in vLLM's log with its format and level.
logger = logging.getLogger("vllm.slimgpt")

__all__ = ["SlimGPTDecoderLayer", "SlimGPTForCausalLM", "layer_config"]

SUPPORTED_BASES = ("llama", "mistral", "qwen2")


class _LayerConfig:
    """The model config as one layer sees it: the layer's widths over the shared settings."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        self.__dict__["_base"] = base
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_base"], name)


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None)
               or config.hidden_size // config.num_attention_heads)


def layer_config(config: Any, layout: LayerLayout) -> _LayerConfig:
    """``config`` with one layer's served widths and the family's switches for the Llama layer."""
    base = base_model_type(config)
    if base not in SUPPORTED_BASES:
        raise LayoutError(f"slimgpt_vllm serves {', '.join('slimgpt_' + b for b in SUPPORTED_BASES)}"
                          f" checkpoints, not model_type {config.model_type!r}")
    layout_kind = dict(getattr(config, "slimgpt_layout", None) or {})
    plain = {"qkv": "separate", "head_norm": "none", "ffn": "gated"}
    if any(layout_kind.get(k, v) != v for k, v in plain.items()):
        raise LayoutError(f"slimgpt_vllm serves separate q/k/v, no head norms and a gated FFN; "
                          f"this checkpoint's slimgpt_layout is {layout_kind}")
    overrides: dict[str, Any] = {
        "num_attention_heads": layout.num_heads,
        "num_key_value_heads": layout.num_kv_heads,
        "intermediate_size": layout.intermediate_size,
        "head_dim": head_dim_of(config),
    }
    if base == "qwen2":  # biases on q/k/v only
        overrides.update(qkv_bias=True, attention_bias=False)
    window = getattr(config, "sliding_window", None)
    if window and not getattr(config, "layer_types", None):
        overrides["layer_types"] = ["sliding_attention"] * int(config.num_hidden_layers)
    return _LayerConfig(config, **overrides)


class SlimGPTDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer with the widths of pruned layer ``i`` (from ``prefix``)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None,
                 **kwargs: Any) -> None:
        config = config or vllm_config.model_config.hf_config
        index = extract_layer_index(prefix)
        widths = layer_widths_from_config(config)[index]
        layout = plan_layer(widths, get_tensor_model_parallel_world_size())
        super().__init__(vllm_config, prefix, config=layer_config(config, layout), **kwargs)
        self.slimgpt_layout = layout


class SlimGPTForCausalLM(LlamaForCausalLM):
    """``SlimGPT{Llama,Mistral,Qwen2}ForCausalLM`` checkpoints (SlimGPT ``hetero`` exports)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        tp = get_tensor_model_parallel_world_size()
        layouts = plan_model(config, tp)  # validates the config before building anything
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=SlimGPTDecoderLayer)
        self.slimgpt_layouts = layouts
        self.slimgpt_head_dim = head_dim_of(config)
        stats = summarize(layouts)
        logger.info(
            "SlimGPT hetero model (%s): %d layers, %d served as pruned, padding adds %d zero "
            "query heads, %d KV-head copies and %d zero FFN channels (tensor parallel %d)",
            config.model_type, stats["layers"], stats["identity_layers"],
            stats["zero_query_heads"], stats["kv_replicas"], stats["zero_ffn_channels"], tp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(
            rewrite_weights(weights, self.slimgpt_layouts, self.slimgpt_head_dim))
