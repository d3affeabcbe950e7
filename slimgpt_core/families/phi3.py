"""Phi-3 and Phi-4 (``phi3``): fused ``qkv_proj`` and ``gate_up_proj``.

Heads are pruned by rows of the fused matrices, section by section (``[q | k | v]`` and
``[gate | up]``), and the result stays fused, so the stock ``Phi3ForCausalLM`` loads a
``uniform`` export. The config has no ``head_dim``; exports write it explicitly.
"""

from __future__ import annotations

from slimgpt_core.families._base import Family, Layout


class Phi3(Family):
    name = "phi3"
    model_types = ("phi3",)
    gguf_architectures = ("phi3",)
    stock_config = "Phi3Config"
    stock_model = "Phi3ForCausalLM"
    layout = Layout(qkv="fused", ffn="fused")


FAMILY = Phi3()
