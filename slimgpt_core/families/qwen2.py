"""Qwen2 / Qwen2.5: the Llama layout with biases on q/k/v (sliced with the heads), none on o."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimgpt_core.families._base import Family


class Qwen2(Family):
    name = "qwen2"
    model_types = ("qwen2",)
    gguf_architectures = ("qwen2",)
    stock_config = "Qwen2Config"
    stock_model = "Qwen2ForCausalLM"

    def shape_fields(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().shape_fields(config), "qkv_bias": True, "o_bias": False}


FAMILY = Qwen2()
