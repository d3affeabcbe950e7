"""SlimGPT ``hetero`` Granite checkpoints, built from vLLM's own Granite layers.

vLLM's Granite model applies the embedding multiplier, the residual multiplier (in each
``GraniteDecoderLayer``), the attention multiplier (as the attention's scale) and the logit
scaling from the shared config, none of which pruning changes; each layer only gets its widths.
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig
from vllm.model_executor.models import granite
from vllm.model_executor.models.granite import GraniteDecoderLayer, GraniteForCausalLM

from slimgpt_vllm.base import SlimGPTModelMixin, layers_built_as, served_view
from slimgpt_vllm.layer_config import PLAIN_LAYOUT

__all__ = ["SlimGPTGraniteDecoderLayer", "SlimGPTGraniteForCausalLM"]


class SlimGPTGraniteDecoderLayer(GraniteDecoderLayer):
    """vLLM's Granite decoder layer with the widths of pruned layer ``i`` (from ``prefix``)."""

    def __init__(self, config: Any, *args: Any, prefix: str = "", **kwargs: Any) -> None:
        view, layout = served_view(config, prefix)
        super().__init__(view, *args, prefix=prefix, **kwargs)
        self.slimgpt_layout = layout


class SlimGPTGraniteForCausalLM(SlimGPTModelMixin, GraniteForCausalLM):
    """``SlimGPTGraniteForCausalLM`` checkpoints (SlimGPT ``hetero`` exports of Granite 3.x)."""

    slimgpt_bases = ("granite",)
    slimgpt_layout = PLAIN_LAYOUT

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        layouts = self._plan_served_layout(vllm_config)
        # GraniteModel builds its layers from the module's GraniteDecoderLayer
        with layers_built_as(granite, "GraniteDecoderLayer", SlimGPTGraniteDecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._record_served_layout(vllm_config.model_config.hf_config, layouts)
