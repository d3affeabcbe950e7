"""Helpers of the export tests (a unique module name: tests/ directories are shared)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from slimgpt_core.export import describe_calibration, export_pruned
from slimgpt_core.pruner import PruneConfig, prune_model

VOCAB = 128

# name -> (config class, model class, heads, kv heads, gqa policy)
CASES = {
    "mha": (LlamaConfig, LlamaForCausalLM, 4, 4, "balanced"),
    "gqa_balanced": (LlamaConfig, LlamaForCausalLM, 8, 2, "balanced"),
    "gqa_free": (LlamaConfig, LlamaForCausalLM, 8, 2, "free"),
    "qwen2_bias": (Qwen2Config, Qwen2ForCausalLM, 8, 2, "balanced"),
    "mistral": (MistralConfig, MistralForCausalLM, 8, 4, "group"),
}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>")


def make_pruned(case: str, schedule: str = "log", seed: int = 0, target: float = 0.4):
    config_cls, model_cls, heads, kv, policy = CASES[case]
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=256,
                     num_hidden_layers=3, num_attention_heads=heads, num_key_value_heads=kv,
                     head_dim=16, max_position_embeddings=128)
    model = model_cls(cfg).eval()
    ids = torch.randint(0, VOCAB, (8, 32))
    result = prune_model(model, ids, PruneConfig(target_ratio=target, schedule=schedule,
                                                 gqa_policy=policy, batch_size=4, min_group=8))
    return result, ids


def export(result, ids, out_dir, profile="hetero", verify=False, **kw):
    kw.setdefault("calibration_info", describe_calibration(
        ids, source="random token ids", dataset="allenai/c4", seed=0))
    return export_pruned(result, out_dir, tokenizer=tiny_tokenizer(), profile=profile,
                         base_model_id="slimgpt-tests/tiny-llama", base_revision="abc123",
                         verify=verify, **kw)


def window(seed: int = 1, n: int = 2, seqlen: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=g)


@torch.no_grad()
def logits(model, ids):
    return model(ids.to(model.device)).logits.float().cpu()


@torch.no_grad()
def greedy(model, ids, n=20):
    out = model.generate(ids.to(model.device), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].cpu()
