"""Gemma 2: norms before and after both branches, GeGLU FFN, head_dim 256 by default.

Embedding scaling, attention and final logit soft-capping, ``query_pre_attn_scalar`` and the
alternating sliding-window layers all live in the stock modules and the model's forward,
which the pruner runs as they are (each layer gets the mask and rotary embedding the model
gives it). The FFN's GeGLU is the stock gate/up/down layout with another activation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from slimgpt_core.families._base import Family


class Gemma2(Family):
    name = "gemma2"
    model_types = ("gemma2",)
    gguf_architectures = ("gemma2",)
    stock_config = "Gemma2Config"
    stock_model = "Gemma2ForCausalLM"
    attn_out_norm = "post_attention_layernorm"
    ffn_in_norm = "pre_feedforward_layernorm"
    ffn_out_norm = "post_feedforward_layernorm"
    heads_divide_hidden = True
    config_defaults: ClassVar[Mapping[str, Any]] = {"head_dim": 256, "tie_word_embeddings": True}


FAMILY = Gemma2()
