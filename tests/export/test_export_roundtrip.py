"""Exported folders reload (in this process) to the same model: logits, shapes, generation."""

from __future__ import annotations

import json

import pytest
import torch
from _export_helpers import CASES, export, greedy, logits, window
from safetensors import safe_open
from transformers import AutoModelForCausalLM

HETERO_CASES = list(CASES)
UNIFORM_CASES = ["mha", "gqa_balanced", "qwen2_bias", "mistral"]


def _load(folder, **kw):
    return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


@pytest.mark.parametrize("case", HETERO_CASES)
def test_hetero_reload_has_per_layer_widths_and_equal_logits(exported, case):
    result, folder = exported(case, "hetero")
    loaded = _load(folder, trust_remote_code=True)
    assert type(loaded).__name__.startswith("SlimGPT")
    for mine, theirs in zip(result.model.model.layers, loaded.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert (getattr(mine.self_attn, name).weight.shape
                    == getattr(theirs.self_attn, name).weight.shape)
        assert mine.mlp.gate_proj.weight.shape == theirs.mlp.gate_proj.weight.shape
    ids = window()
    torch.testing.assert_close(logits(loaded, ids), logits(result.model, ids), rtol=0, atol=1e-5)


def test_free_policy_case_has_an_irregular_kv_index_layer(exported):
    _result, folder = exported("gqa_free", "hetero")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["layer_kv_index"] is not None
    irregular = [idx for idx, h, kv in zip(cfg["layer_kv_index"], cfg["layer_num_heads"],
                                           cfg["layer_num_kv_heads"])
                 if h % kv or idx != [j // (h // kv) for j in range(h)]]
    assert irregular, "the free-policy fixture should produce at least one irregular layer"
    loaded = _load(folder, trust_remote_code=True)
    routed = [layer.self_attn for layer in loaded.model.layers
              if getattr(layer.self_attn, "kv_index_list", None) is not None]
    assert routed and all(attn.config._attn_implementation == "slimgpt_kv_index"
                          for attn in routed)


def test_hetero_config_without_irregular_layers_has_no_kv_index(exported):
    _, folder = exported("gqa_balanced", "hetero")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg.get("layer_kv_index") is None
    assert cfg["model_type"] == "slimgpt_llama"
    assert cfg["architectures"] == ["SlimGPTLlamaForCausalLM"]
    assert cfg["auto_map"] == {
        "AutoConfig": "modeling_slimgpt.SlimGPTLlamaConfig",
        "AutoModelForCausalLM": "modeling_slimgpt.SlimGPTLlamaForCausalLM",
    }
    assert (folder / "modeling_slimgpt.py").is_file()


def test_hetero_qwen2_config_names_qwen2_classes(exported):
    _, folder = exported("qwen2_bias", "hetero")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "slimgpt_qwen2"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_slimgpt.SlimGPTQwen2ForCausalLM"


@pytest.mark.parametrize("case", UNIFORM_CASES)
def test_uniform_reloads_without_remote_code_with_equal_logits(exported, case):
    result, folder = exported(case, "uniform")
    cfg = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in cfg
    assert not (folder / "modeling_slimgpt.py").exists()
    assert not {"layer_num_heads", "layer_num_kv_heads", "layer_intermediate_sizes",
                "layer_kv_index"} & set(cfg)
    loaded = _load(folder)  # no trust_remote_code
    assert type(loaded).__module__.startswith("transformers.models.")
    assert cfg["head_dim"] == 16
    assert cfg["num_attention_heads"] == result.model.model.layers[0].self_attn.q_proj.out_features // 16
    ids = window()
    torch.testing.assert_close(logits(loaded, ids), logits(result.model, ids), rtol=0, atol=1e-5)


def _saved_keys(folder):
    keys = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as fh:
            keys |= set(fh.keys())
    return keys


@pytest.mark.parametrize("case", ["gqa_free", "qwen2_bias"])
def test_hetero_weight_keys_equal_the_standard_architecture(exported, pruned, case):
    result, folder = exported(case, "hetero")
    _, model_cls, *_ = CASES[case]
    dense = model_cls(result.model.config)  # the dense architecture of the base model
    expected = set(dense.state_dict()) - set(getattr(dense, "all_tied_weights_keys", {}) or {})
    assert _saved_keys(folder) == expected


@pytest.mark.parametrize("profile", ["hetero", "uniform"])
def test_folders_hold_no_pickles(exported, profile):
    for case in (HETERO_CASES if profile == "hetero" else UNIFORM_CASES):
        _, folder = exported(case, profile)
        names = [p.name for p in folder.rglob("*")]
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
        assert any(n.endswith(".safetensors") for n in names)


def test_small_max_shard_size_writes_an_index_and_reloads(pruned, tmp_path):
    result, ids = pruned("gqa_free")
    folder = tmp_path / "sharded"
    export(result, ids, folder, max_shard_size="100KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    loaded = _load(folder, trust_remote_code=True)
    ids2 = window()
    torch.testing.assert_close(logits(loaded, ids2), logits(result.model, ids2), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("case", "profile"), [("gqa_free", "hetero"), ("qwen2_bias", "hetero"),
                                               ("gqa_balanced", "uniform")])
def test_greedy_generation_of_reloaded_model_equals_in_memory(exported, case, profile):
    result, folder = exported(case, profile)
    loaded = _load(folder, trust_remote_code=(profile == "hetero"))
    prompt = window(seed=7, n=2, seqlen=8)
    out = greedy(loaded, prompt)
    assert out.shape == (2, 20)
    assert torch.equal(out, greedy(result.model, prompt))
