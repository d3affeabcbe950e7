"""Gemma 3, text only (``Gemma3ForCausalLM``: the 270M and 1B checkpoints, ``gemma3_text``).

Gemma 2's layer (norms around both branches, GeGLU, soft-capping where configured, embedding
scaling) plus per-head q/k norms of ``head_dim`` (shared weights, never sliced) and local
sliding-window layers with their own rotary base between the global ones: each layer is run
with the rotary embedding and mask the model's forward gives it. The multimodal ``gemma3``
checkpoints (vision tower) are not handled here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from slimgpt_core.families._base import Family, Layout


class Gemma3Text(Family):
    name = "gemma3"
    model_types = ("gemma3_text",)
    gguf_architectures = ("gemma3",)
    stock_config = "Gemma3TextConfig"
    stock_model = "Gemma3ForCausalLM"
    layout = Layout(head_norm="per_head")
    attn_out_norm = "post_attention_layernorm"
    ffn_in_norm = "pre_feedforward_layernorm"
    ffn_out_norm = "post_feedforward_layernorm"
    heads_divide_hidden = True
    config_defaults: ClassVar[Mapping[str, Any]] = {"head_dim": 256, "tie_word_embeddings": True}


FAMILY = Gemma3Text()
