"""Tiny random Llama-layout models for fast, exact tests."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)


def tiny_llama(num_heads: int = 8, num_kv_heads: int = 2, layers: int = 3, head_dim: int = 16,
               hidden: int = 64, intermediate: int = 256, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_kv_heads, head_dim=head_dim,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def peaked_llama() -> LlamaForCausalLM:
    """A 4-layer tiny Llama with confident predictions (lm_head x 10): divergences well above
    float noise, so an allocation search finds better allocations and has some to judge."""
    model = tiny_llama(layers=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def tiny_qwen2(seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def windows(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, seqlen), generator=g)
