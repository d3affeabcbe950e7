"""Mistral: the Llama layout (sliding-window attention is the stock module's business)."""

from __future__ import annotations

from slimgpt_core.families._base import Family


class Mistral(Family):
    name = "mistral"
    model_types = ("mistral",)
    stock_config = "MistralConfig"
    stock_model = "MistralForCausalLM"


FAMILY = Mistral()
