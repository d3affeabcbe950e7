"""SlimGPT ``hetero`` checkpoints of the Llama-layer families, built from vLLM's own Llama layers.

Every decoder layer is vLLM's ``LlamaDecoderLayer`` (``QKVParallelLinear``, paged ``Attention``,
``MergedColumnParallelLinear``/``RowParallelLinear``, fused RMSNorm, rotary embedding), given
the widths of its pruned layer through a per-layer view of the config. So the KV cache is paged
per layer with that layer's KV heads, the model compiles and captures CUDA graphs like vLLM's
Llama, and tensor parallelism splits each layer like any Llama layer. Layers whose widths do not
fit vLLM's grouped layout or the tensor-parallel split are served through the exact padded layout
of :mod:`slimgpt_core.served_layout` (zero heads, KV copies, zero channels), rewritten while loading.

Families: ``slimgpt_llama``, ``slimgpt_mistral`` and ``slimgpt_qwen2`` (Qwen2's q/k/v biases via
the Llama layer's ``qkv_bias`` switch; a sliding window becomes the layers' ``layer_types``), and
``slimgpt_phi3`` (Phi-3/Phi-4: vLLM's own Phi-3 is its Llama model loading the fused
``qkv_proj``/``gate_up_proj`` as they are; partial rotary comes with ``rope_parameters``).
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.phi3 import Phi3ForCausalLM

from slimgpt_core.served_layout import LayerLayout, base_model_type
from slimgpt_vllm.base import SlimGPTModelMixin, served_layer
from slimgpt_vllm.layer_config import PLAIN_LAYOUT, LayerConfigView, layout, width_overrides

__all__ = ["SlimGPTDecoderLayer", "SlimGPTForCausalLM", "SlimGPTPhi3ForCausalLM",
           "layer_config"]


def layer_config(config: Any, served: LayerLayout) -> LayerConfigView:
    """``config`` with one layer's served widths and the family's switches for the Llama layer."""
    overrides = width_overrides(config, served)
    if base_model_type(config) == "qwen2":  # biases on q/k/v only
        overrides.update(qkv_bias=True, attention_bias=False)
    window = getattr(config, "sliding_window", None)
    if window and not getattr(config, "layer_types", None):
        overrides["layer_types"] = ["sliding_attention"] * int(config.num_hidden_layers)
    return LayerConfigView(config, **overrides)


class SlimGPTDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer with the widths of pruned layer ``i`` (from ``prefix``)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: Any = None,
                 **kwargs: Any) -> None:
        config = config or vllm_config.model_config.hf_config
        served = served_layer(config, prefix)
        super().__init__(vllm_config, prefix, config=layer_config(config, served), **kwargs)
        self.slimgpt_layout = served


class SlimGPTForCausalLM(SlimGPTModelMixin, LlamaForCausalLM):
    """``SlimGPT{Llama,Mistral,Qwen2}ForCausalLM`` checkpoints (SlimGPT ``hetero`` exports)."""

    slimgpt_bases = ("llama", "mistral", "qwen2")
    slimgpt_layout = PLAIN_LAYOUT

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        layouts = self._plan_served_layout(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=SlimGPTDecoderLayer)
        self._record_served_layout(vllm_config.model_config.hf_config, layouts)


class SlimGPTPhi3ForCausalLM(SlimGPTForCausalLM):
    """``SlimGPTPhi3ForCausalLM``: Phi-3/Phi-4, fused ``qkv_proj`` and ``gate_up_proj``."""

    slimgpt_bases = ("phi3",)
    slimgpt_layout = layout(qkv="fused", ffn="fused")
    packed_modules_mapping = Phi3ForCausalLM.packed_modules_mapping
