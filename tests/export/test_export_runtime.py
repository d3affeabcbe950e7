"""The hetero export works with the runtime options users reach for: attention kernels,
dtypes, device_map="auto", the KV cache, and LoRA fine-tuning with peft."""

from __future__ import annotations

import pytest
import torch
from _export_helpers import greedy, logits, window
from transformers import AutoModelForCausalLM


def _load(folder, **kw):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kw).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hetero_attention_implementations_match_in_memory_model(exported, impl):
    result, folder = exported("gqa_free", "hetero")
    loaded = _load(folder, attn_implementation=impl)
    assert loaded.config._attn_implementation == impl
    ids = window()
    torch.testing.assert_close(logits(loaded, ids), logits(result.model, ids), rtol=0, atol=1e-4)
    prompt = window(seed=3, n=1, seqlen=6)
    assert torch.equal(greedy(loaded, prompt), greedy(result.model, prompt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_hetero_loads_and_generates_in_dtype(exported, dtype):
    result, folder = exported("gqa_free", "hetero")
    loaded = _load(folder, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    ids = window()
    ref = logits(result.model, ids)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(logits(loaded, ids), ref, rtol=0, atol=tol * max(1.0, ref.abs().max().item()))
    out = greedy(loaded, window(seed=3, n=1, seqlen=6), n=8)
    assert out.shape == (1, 8)


def test_hetero_loads_with_device_map_auto(exported):
    result, folder = exported("gqa_free", "hetero")
    loaded = _load(folder, device_map="auto")
    # "auto" picks the accelerator when there is one, else the CPU; nothing may stay on meta
    assert all(p.device.type != "meta" for p in loaded.parameters())
    ids = window()
    device = next(loaded.parameters()).device
    torch.testing.assert_close(logits(loaded, ids.to(device)).cpu(), logits(result.model, ids),
                               rtol=0, atol=1e-4)


def test_kv_cache_decoding_matches_full_forward(exported):
    """Token-by-token decoding through the cache gives the logits of one full forward pass,
    including layers whose query heads read KV heads by index."""
    _, folder = exported("gqa_free", "hetero")
    loaded = _load(folder)
    ids = window(seed=5, n=1, seqlen=12)
    full = logits(loaded, ids)
    with torch.no_grad():
        out = loaded(ids[:, :6], use_cache=True)
        cache = out.past_key_values
        steps = [out.logits[:, -1]]
        for t in range(6, 12):
            out = loaded(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 5:11], rtol=0, atol=1e-5)


def test_lora_step_on_q_and_v_changes_the_loss(exported):
    from peft import LoraConfig, get_peft_model

    _, folder = exported("gqa_free", "hetero")
    torch.manual_seed(0)
    model = _load(folder)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # every layer's q/v got an adapter, including the index-routed ones
    assert sum(".q_proj.lora_A" in n for n in trainable) == len(model.model.layers)
    peft_model.train()
    ids = window(seed=9, n=2, seqlen=16)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    loss0 = peft_model(input_ids=ids, labels=ids).loss
    loss0.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        loss1 = peft_model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss1) and abs(loss1.item() - loss0.item()) > 1e-6
