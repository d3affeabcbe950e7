"""The worker's cheap dense-vs-pruned speed measurement (slimgpt_core.speed) and what the model
card says about speed and serving."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from _export_helpers import export, make_pruned

from slimgpt_core.model_card import serving_text
from slimgpt_core.speed import compare_speed


@pytest.fixture(scope="module")
def pruned():
    return make_pruned("gqa_balanced")


def test_speed_comparison_times_both_models_on_the_pruned_models_device(pruned):
    result, _ = pruned
    dense_config = type(result.model.config)(**{
        k: v for k, v in result.model.config.to_dict().items()
        if k not in ("model_type", "architectures", "transformers_version")})
    speed = compare_speed(result.model, dense_config, prefill_tokens=32, decode_steps=4, reps=1)
    assert speed["device"] == "cpu" and speed["dtype"] == "float32"
    for key in ("dense_prefill_tok_s", "pruned_prefill_tok_s", "dense_decode_tok_s",
                "pruned_decode_tok_s"):
        assert speed[key] > 0
    assert speed["prefill_speedup"] == pytest.approx(
        speed["pruned_prefill_tok_s"] / speed["dense_prefill_tok_s"], rel=0.01)
    # the dense twin really is the dense shape: 8 heads / 2 KV heads / 256 channels per layer
    assert speed["param_ratio"] == pytest.approx(
        result.params_before / result.params_after, rel=1e-3)


def test_card_shows_measured_speed_and_how_to_serve(pruned, tmp_path):
    result, ids = pruned
    report = export(result, ids, tmp_path / "m", profile="hetero")
    from slimgpt_core.model_card import render_model_card

    pcfg = dict(report.pruning_config, speed={
        "device": "NVIDIA H200", "dtype": "bfloat16", "runtime": "transformers eager, sdpa",
        "prefill_tokens": 256, "dense_prefill_tok_s": 1000.0, "pruned_prefill_tok_s": 1250.0,
        "prefill_speedup": 1.25, "dense_decode_tok_s": 20.0, "pruned_decode_tok_s": 21.0,
        "decode_speedup": 1.05})
    card = render_model_card(base_model_id="org/base", base_revision=None, license="mit",
                             profile="hetero", pruning=pcfg, calibration={}, eval_metrics=None,
                             library_version="x", repo_or_path="org/pruned")
    assert "| 1,000 | 1,250 (1.25x) |" in card
    assert "NVIDIA H200, bfloat16" in card
    assert 'pip install "slimgpt-service[vllm]"' in card and "vllm serve org/pruned" in card


def test_uniform_card_serves_without_plugin_except_qwen2():
    assert "no plugin needed" in serving_text("uniform", "o/m", "LlamaForCausalLM")
    qwen = serving_text("uniform", "o/m", "Qwen2ForCausalLM")
    assert "cannot load" in qwen and "hetero" in qwen


def test_hetero_card_says_when_the_vllm_plugin_does_not_serve_the_family():
    served = serving_text("hetero", "o/m", "SlimGPTQwen3ForCausalLM")
    assert "vllm serve o/m" in served
    olmo = serving_text("hetero", "o/m", "SlimGPTOlmo2ForCausalLM")
    assert "does not serve" in olmo and "vllm serve" not in olmo
