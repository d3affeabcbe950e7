"""Granite (3.x dense): the Llama layout with multipliers.

The embedding multiplier and the logit scaling live in the model's forward and the attention
multiplier in the stock attention module; the residual multiplier scales each branch before it
joins the residual stream, so the pruner's split forward applies it too.
"""

from __future__ import annotations

from typing import Any

from slimgpt_core.families._base import Family


class Granite(Family):
    name = "granite"
    model_types = ("granite",)
    stock_config = "GraniteConfig"
    stock_model = "GraniteForCausalLM"

    def residual_scale(self, layer: Any) -> float:
        return float(layer.residual_multiplier)


FAMILY = Granite()
