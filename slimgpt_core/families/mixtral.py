"""Mixtral: the Mistral attention with a routed mixture of experts in every layer.

The router (``mlp.gate``) is never pruned; each expert's FFN channels are pruned with the
Hessian of the tokens routed to it (:mod:`slimgpt_core.experts`). Sliding-window attention is
the stock module's business, as for Mistral.
"""

from __future__ import annotations

from slimgpt_core.families._moe import MoEFamily


class Mixtral(MoEFamily):
    name = "mixtral"
    model_types = ("mixtral",)
    stock_config = "MixtralConfig"
    stock_model = "MixtralForCausalLM"


FAMILY = Mixtral()
