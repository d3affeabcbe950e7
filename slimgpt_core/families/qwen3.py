"""Qwen3 (dense): the Llama layout plus RMS norms of ``head_dim`` on every query and key head.

Those norms act per head with one shared weight, so they stay whole when heads go; some
layers may use sliding-window attention (the stock modules and masks handle that).
"""

from __future__ import annotations

from slimgpt_core.families._base import Family, Layout


class Qwen3(Family):
    name = "qwen3"
    model_types = ("qwen3",)
    gguf_architectures = ("qwen3",)
    stock_config = "Qwen3Config"
    stock_model = "Qwen3ForCausalLM"
    layout = Layout(head_norm="per_head")


FAMILY = Qwen3()
