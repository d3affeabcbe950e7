"""One tiny random model per supported family, built from its stock transformers config.

Every case keeps what makes the family its own switched on (biases, per-head or projection
norms, fused matrices, sliding-window layers, soft-capping, multipliers) and 1-D weights
(norms, biases) are randomised, so that a norm or bias sliced with the wrong heads shows.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

VOCAB = 128
#: Shared by every case: 8 query heads in 2 KV groups of head_dim 16, FFN 256, 3 layers.
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}

#: family name -> (stock config class, stock model class, family-specific config)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              # layers 1.. slide over 8 tokens, layer 0 attends to everything
              {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"sliding_window": 8, "query_pre_attn_scalar": 16,
                "attn_logit_softcapping": 20.0, "final_logit_softcapping": 10.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"sliding_window": 8, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
                "final_logit_softcapping": 10.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.75}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                {"embedding_multiplier": 4.0, "residual_multiplier": 0.5,
                 "attention_multiplier": 0.1, "logits_scaling": 2.0, "attention_bias": True,
                 "mlp_bias": True}),
    # Mixture of experts: 4 experts of 512 channels, 2 per token (Mixtral's intermediate_size,
    # Qwen3-MoE's moe_intermediate_size; Qwen3-MoE's dense intermediate_size is then unused).
    # Expert widths move in steps of 8 channels in every expert, so experts narrower than
    # this make steps too coarse for a 3-layer toy to meet the target within 1%.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 512,
                 "sliding_window": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 512,
                   "norm_topk_prob": True}),
}
#: The cases whose FFN is a routed mixture of experts.
MOE_FAMILIES = ["mixtral", "qwen3_moe"]
FAMILIES = list(CASES)


def tiny_model(family: str, seed: int = 0,
               overrides: dict[str, Any] | None = None) -> PreTrainedModel:
    config_name, model_name, extra = CASES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **(overrides or {})})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases: make them matter
                p.add_(torch.randn_like(p) * 0.3)
    return model


def windows(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=g)
