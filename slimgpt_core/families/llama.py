"""Llama (and every checkpoint that uses its layout: SmolLM2, TinyLlama, Llama 2/3)."""

from __future__ import annotations

from slimgpt_core.families._base import Family


class Llama(Family):
    name = "llama"
    model_types = ("llama",)
    gguf_architectures = ("llama",)
    stock_config = "LlamaConfig"
    stock_model = "LlamaForCausalLM"
    heads_divide_hidden = True


FAMILY = Llama()
