"""SlimGPT ``hetero`` Gemma 2 and Gemma 3 (text) checkpoints, built from vLLM's own Gemma layers.

vLLM's ``Gemma2DecoderLayer``/``Gemma3DecoderLayer`` keep everything that makes Gemma Gemma from
the shared config: the norms before and after both branches, GeGLU, ``query_pre_attn_scalar``,
attention and final logit soft-capping, the embedding scaling, the alternating sliding-window
layers (and Gemma 3's per-layer-type rotary base); each layer only gets its widths. Gemma 3's
per-head ``q_norm``/``k_norm`` (``head_dim`` wide, shared by all heads) are not sliced, and the
padded layout stays exact with them (a zero head's query is zero before and after its norm).
GeGLU of a zero channel is zero, so zero FFN channels are exact too.
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.model_executor.models import gemma2, gemma3

from slimgpt_vllm.base import SlimGPTModelMixin, layers_built_as, served_view
from slimgpt_vllm.layer_config import PLAIN_LAYOUT, layout

__all__ = ["SlimGPTGemma2DecoderLayer", "SlimGPTGemma2ForCausalLM",
           "SlimGPTGemma3DecoderLayer", "SlimGPTGemma3ForCausalLM"]


class SlimGPTGemma2DecoderLayer(gemma2.Gemma2DecoderLayer):
    """vLLM's Gemma 2 decoder layer with the widths of pruned layer ``i`` (from ``prefix``)."""

    def __init__(self, config: Any, *args: Any, prefix: str = "", **kwargs: Any) -> None:
        view, layout = served_view(config, prefix)
        super().__init__(view, *args, prefix=prefix, **kwargs)
        self.slimgpt_layout = layout


class SlimGPTGemma3DecoderLayer(gemma3.Gemma3DecoderLayer):
    """vLLM's Gemma 3 decoder layer with the widths of pruned layer ``i`` (from ``prefix``)."""

    def __init__(self, config: Any, *args: Any, prefix: str = "", **kwargs: Any) -> None:
        view, layout = served_view(config, prefix)
        super().__init__(view, *args, prefix=prefix, **kwargs)
        self.slimgpt_layout = layout


class SlimGPTGemma2ForCausalLM(SlimGPTModelMixin, gemma2.Gemma2ForCausalLM):
    """``SlimGPTGemma2ForCausalLM`` checkpoints (SlimGPT ``hetero`` exports of Gemma 2)."""

    slimgpt_bases = ("gemma2",)
    slimgpt_layout = PLAIN_LAYOUT

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        layouts = self._plan_served_layout(vllm_config)
        # Gemma2Model builds its layers from the module's Gemma2DecoderLayer
        with layers_built_as(gemma2, "Gemma2DecoderLayer", SlimGPTGemma2DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._record_served_layout(vllm_config.model_config.hf_config, layouts)


class SlimGPTGemma3ForCausalLM(SlimGPTModelMixin, gemma3.Gemma3ForCausalLM):
    """``SlimGPTGemma3ForCausalLM`` checkpoints (SlimGPT ``hetero`` exports of Gemma 3 text)."""

    slimgpt_bases = ("gemma3_text",)
    slimgpt_layout = layout(head_norm="per_head")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        layouts = self._plan_served_layout(vllm_config)
        # Gemma3Model builds its layers from the module's Gemma3DecoderLayer
        with layers_built_as(gemma3, "Gemma3DecoderLayer", SlimGPTGemma3DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._record_served_layout(vllm_config.model_config.hf_config, layouts)
