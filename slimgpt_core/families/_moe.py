"""What the mixture-of-experts families share (Mixtral, Qwen3-MoE): routed experts stored the
transformers 5.x way, as fused 3-D parameters of one ``mlp.experts`` module.

Layer ``i``'s FFN is ``mlp.gate`` (the router, ``[E, D]``, never pruned) and ``mlp.experts``
with ``gate_up_proj`` ``[E, 2F, D]`` (expert ``e``'s rows ``[gate | up]``) and ``down_proj``
``[E, D, F]``. Each expert's channels are pruned on their own (:mod:`slimgpt_core.experts`),
but every expert of a layer keeps the *same number* of them: the fused parameters hold one
width per layer. So the plan's "channel" of a MoE layer is one channel in each of the ``E``
experts (``E * 3D`` parameters), and its ``intermediate_size`` is the per-expert width.

Torch-free at import like every adapter (torch is imported inside the methods that compute).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from slimgpt_core.families._base import Family, Layout


class MoEFamily(Family):
    """A decoder whose every layer's FFN is a routed mixture of gated experts."""

    layout = Layout(ffn="experts")
    #: ``config.json`` keys that may carry the expert count (transformers writes
    #: ``num_local_experts`` for both families; Qwen's own configs say ``num_experts``).
    expert_count_keys: ClassVar[tuple[str, ...]] = ("num_local_experts", "num_experts")
    vllm_hetero_refusal = (
        "the plugin has no mixture-of-experts layers (per-layer expert widths are not "
        "implemented for vLLM here). Serve the uniform export, a stock checkpoint for vLLM's "
        "own MoE model, or this one with transformers (trust_remote_code=True).")

    # -- torch-free -----------------------------------------------------------------------------
    def num_experts(self, config: Mapping[str, Any]) -> int:
        for key in self.expert_count_keys:
            if config.get(key) is not None:
                return int(config[key])
        raise KeyError(self.expert_count_keys[0])

    def shape_fields(self, config: Mapping[str, Any]) -> dict[str, Any]:
        fields = super().shape_fields(config)
        experts = self.num_experts(config)
        if experts < 1:
            from slimgpt_core.schedule import PlanError

            raise PlanError(f"{self.name}: model config has {experts} experts; a mixture of "
                            "experts needs at least one")
        # Expert projections carry no bias in either family.
        return {**fields, "num_experts": experts, "mlp_bias": False}

    # -- modules --------------------------------------------------------------------------------
    def experts(self, layer: Any) -> Any:
        """The module holding every expert's fused 3-D weights."""
        return layer.mlp.experts

    def router(self, layer: Any) -> Any:
        return layer.mlp.gate

    def down_proj(self, layer: Any) -> Any:
        raise TypeError(f"{self.name}: the FFN is a mixture of experts; there is no single "
                        "down_proj (see slimgpt_core.experts)")

    def ffn_width(self, layer: Any) -> int:
        return int(self.experts(layer).down_proj.shape[-1])

    def num_layer_experts(self, layer: Any) -> int:
        return int(self.experts(layer).down_proj.shape[0])

    def route(self, layer: Any, x: Any) -> tuple[Any, Any]:
        """``(top_k_index, top_k_weights)``, each ``[tokens, k]``, for FFN inputs ``x``
        ``[tokens, D]``: the stock router's own decision, so Hessians follow real routing."""
        _logits, weights, index = self.router(layer)(x)
        return index, weights

    def expert_hidden(self, layer: Any, x: Any, expert: int) -> Any:
        """The input of expert ``expert``'s ``down_proj`` for tokens ``x`` ``[n, D]``: the
        stock eager expert forward up to the down projection (``act(gate) * up``)."""
        import torch.nn.functional as F

        experts = self.experts(layer)
        if not getattr(experts, "is_concatenated", True) or getattr(experts, "has_bias", False):
            raise TypeError(f"{self.name}: expected experts with concatenated [gate | up] rows "
                            "and no bias (the transformers 5.x layout)")
        gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return experts.act_fn(gate) * up
