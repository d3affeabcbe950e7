"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k norms of
``head_dim``, shared weights, never sliced) and a routed mixture of experts of width
``moe_intermediate_size``.

Refused: checkpoints that mix dense FFN layers in (``mlp_only_layers`` non-empty or
``decoder_sparse_step`` other than 1). Every released Qwen3-MoE uses experts in all layers,
and a layer-dependent FFN kind would need per-layer parameter arithmetic in the plan. Qwen3-MoE
has no shared expert (that is Qwen2-MoE, not supported here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimgpt_core.families._base import Layout
from slimgpt_core.families._moe import MoEFamily


class Qwen3Moe(MoEFamily):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    stock_config = "Qwen3MoeConfig"
    stock_model = "Qwen3MoeForCausalLM"
    layout = Layout(head_norm="per_head", ffn="experts")
    ffn_width_key = "moe_intermediate_size"

    def check_supported(self, config: Mapping[str, Any]) -> None:
        dense_layers = list(config.get("mlp_only_layers") or [])
        step = config.get("decoder_sparse_step")
        if dense_layers or (step is not None and int(step) != 1):
            from slimgpt_core.schedule import PlanError

            raise PlanError(
                "qwen3_moe checkpoints with dense FFN layers between the expert layers "
                f"(mlp_only_layers={dense_layers}, decoder_sparse_step={step}) are not "
                "supported; only Qwen3-MoE models with experts in every layer are")


FAMILY = Qwen3Moe()
