"""SlimGPT ``hetero`` Qwen3 checkpoints, built from vLLM's own Qwen3 layers.

vLLM's ``Qwen3DecoderLayer`` normalises every query and key head with one shared ``q_norm``/
``k_norm`` of ``head_dim``: pruning heads leaves those weights as they are, and the padded
layout stays exact (a zero head's query is zero before and after its norm; a KV copy is normed
like its original). vLLM's Qwen3 refuses sliding windows on only some layers; so does this.
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model

from slimgpt_vllm.base import SlimGPTModelMixin, layers_built_as, served_view
from slimgpt_vllm.layer_config import layout

__all__ = ["SlimGPTQwen3DecoderLayer", "SlimGPTQwen3ForCausalLM"]


class SlimGPTQwen3DecoderLayer(Qwen3DecoderLayer):
    """vLLM's Qwen3 decoder layer with the widths of pruned layer ``i`` (from ``prefix``)."""

    def __init__(self, config: Any, *args: Any, prefix: str = "", **kwargs: Any) -> None:
        view, layout = served_view(config, prefix)
        super().__init__(view, *args, prefix=prefix, **kwargs)
        self.slimgpt_layout = layout


class SlimGPTQwen3ForCausalLM(SlimGPTModelMixin, Qwen3ForCausalLM):
    """``SlimGPTQwen3ForCausalLM`` checkpoints (SlimGPT ``hetero`` exports of Qwen3)."""

    slimgpt_bases = ("qwen3",)
    slimgpt_layout = layout(head_norm="per_head")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        layouts = self._plan_served_layout(vllm_config)
        with layers_built_as(Qwen3Model, "decoder_layer_type", SlimGPTQwen3DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._record_served_layout(vllm_config.model_config.hf_config, layouts)
