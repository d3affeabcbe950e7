"""A cheap, bounded measurement of how much faster a pruned model runs than its dense original.

Used by the worker after pruning (job metrics, ``pruning_config.json``, model card). Both models
run in transformers on the same device and dtype, with the attention kernel the pruned model was
loaded with (sdpa by default), eager (no compilation): prefill throughput of one window of
``prefill_tokens`` and greedy decode throughput at batch 1 through the KV cache. The dense model
is rebuilt from the base config with random weights (same compute as the real ones; the real
dense weights no longer exist, pruning works in place), on the device only while it is measured.

The figures are what a plain transformers user sees on the worker's device. Eager decoding at
batch 1 on a GPU is bound by per-kernel launch overhead, which pruning does not shrink, so its
speed-up understates what a serving engine with CUDA graphs gets (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import inspect
import statistics
import time
from typing import Any

import torch
from torch import nn

__all__ = ["SpeedSkipped", "compare_speed", "measure_speed"]

#: Fits the dense model next to the pruned one only when both take at most this share of the
#: free accelerator memory (the pruned model may already be there).
MAX_MEMORY_SHARE = 0.8


class SpeedSkipped(RuntimeError):
    """The measurement would not be cheap here (memory); the reason is the message."""


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def measure_speed(model: nn.Module, *, prefill_tokens: int = 256, decode_steps: int = 16,
                  reps: int = 2, seed: int = 0) -> dict[str, float]:
    """Prefill tokens/s (batch 1) and decode tokens/s (batch 1, KV cache) of ``model``."""
    device = _device_of(model)
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, prefill_tokens), generator=gen).to(device)
    # transformers 5.x renamed the cache argument (past_key_values -> cache); use what exists
    cache_kw = ("cache" if "cache" in inspect.signature(model.forward).parameters
                else "past_key_values")
    was_training = model.training
    model.eval()
    try:
        model(ids[:, :16], use_cache=True, logits_to_keep=1)  # warm-up
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            _sync(device)
            times.append(time.perf_counter() - t0)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        out = model(tok, use_cache=True, **{cache_kw: cache})  # first step: warm-up
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            out = model(tok, use_cache=True, **{cache_kw: cache})
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode_s = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return {"prefill_tok_s": prefill_tokens / statistics.median(times),
            "decode_tok_s": decode_steps / decode_s}


def _dense_like(pruned: nn.Module, dense_config: Any) -> nn.Module:
    device, dtype = _device_of(pruned), next(pruned.parameters()).dtype
    config = copy.deepcopy(dense_config)
    config._attn_implementation = getattr(pruned.config, "_attn_implementation", None) or "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        from transformers import AutoModelForCausalLM

        dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return dense.eval()


def compare_speed(pruned: nn.Module, dense_config: Any, *, prefill_tokens: int = 256,
                  decode_steps: int = 16, reps: int = 2) -> dict[str, Any]:
    """Measure ``pruned`` and a dense model of ``dense_config`` alike; speed-ups are
    pruned / dense throughput. Raises :class:`SpeedSkipped` when the dense copy would not fit."""
    device = _device_of(pruned)
    dtype = next(pruned.parameters()).dtype
    pruned_bytes = _param_bytes(pruned)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # the dense model is at most pruned / (1 - ratio) in size; estimate from the counts
        dense_bytes = int(pruned_bytes / max(0.05, _kept_share(pruned, dense_config)))
        if dense_bytes + pruned_bytes > MAX_MEMORY_SHARE * (free + pruned_bytes):
            raise SpeedSkipped(f"the dense model ({dense_bytes / 2**30:.1f} GiB) does not fit "
                               f"next to the pruned one in {free / 2**30:.1f} GiB free")
    t0 = time.perf_counter()
    after = measure_speed(pruned, prefill_tokens=prefill_tokens, decode_steps=decode_steps,
                          reps=reps)
    dense = _dense_like(pruned, dense_config)
    try:
        before = measure_speed(dense, prefill_tokens=prefill_tokens, decode_steps=decode_steps,
                               reps=reps)
        dense_params = sum(p.numel() for p in dense.parameters())
    finally:
        del dense
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "runtime": "transformers eager, "
                   + str(getattr(pruned.config, "_attn_implementation", None) or "sdpa"),
        "prefill_tokens": prefill_tokens,
        "decode_steps": decode_steps,
        "dense_prefill_tok_s": round(before["prefill_tok_s"], 1),
        "pruned_prefill_tok_s": round(after["prefill_tok_s"], 1),
        "prefill_speedup": round(after["prefill_tok_s"] / before["prefill_tok_s"], 3),
        "dense_decode_tok_s": round(before["decode_tok_s"], 2),
        "pruned_decode_tok_s": round(after["decode_tok_s"], 2),
        "decode_speedup": round(after["decode_tok_s"] / before["decode_tok_s"], 3),
        "param_ratio": round(dense_params / sum(p.numel() for p in pruned.parameters()), 3),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _kept_share(pruned: nn.Module, dense_config: Any) -> float:
    """Pruned / dense parameter count from the config arithmetic (no dense model built)."""
    h = int(dense_config.hidden_size)
    n = int(dense_config.num_hidden_layers)
    heads = int(dense_config.num_attention_heads)
    kv = int(getattr(dense_config, "num_key_value_heads", None) or heads)
    d = int(getattr(dense_config, "head_dim", None) or h // heads)
    layer = 2 * h * d * (heads + kv) + 3 * h * int(dense_config.intermediate_size)
    embed = int(dense_config.vocab_size) * h * (1 if dense_config.tie_word_embeddings else 2)
    dense = n * layer + embed
    return sum(p.numel() for p in pruned.parameters()) / dense
