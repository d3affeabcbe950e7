"""What an export folder documents: pruning_config.json, the model card, the chart, the tokenizer,
and the errors for exports that cannot be written."""

from __future__ import annotations

import json

import pytest
from _export_helpers import export, make_pruned, tiny_tokenizer
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

from slimgpt_core.export import ExportError, export_config
from slimgpt_core.modeling_slimgpt import set_attention_layout


def test_pruning_config_records_method_widths_calibration_and_versions(exported):
    result, folder = exported("gqa_free", "hetero")
    pc = json.loads((folder / "pruning_config.json").read_text())
    assert pc["method"] == "slimgpt" and pc["library_version"]
    assert pc["profile"] == "hetero" and pc["gqa_policy"] == "free" and pc["schedule"] == "log"
    assert pc["target_ratio"] == 0.4 and 0.3 < pc["achieved_ratio"] < 0.5
    assert pc["params_before"] == result.params_before
    assert pc["params_after"] == result.params_after < result.params_before
    assert pc["base_model"] == {"id": "slimgpt-tests/tiny-llama", "revision": "abc123",
                                "model_type": "llama", "license": "other"}
    assert len(pc["layers"]) == 3
    for entry, report in zip(pc["layers"], result.layers):
        assert entry["heads_kept"] == report.heads_kept
        assert entry["kv_heads_kept"] == report.kv_heads_kept
        assert entry["kv_index"] == report.kv_index
        assert entry["channels_kept"] == report.channels_kept
        assert entry["num_heads"] == len(report.heads_kept)
        assert entry["intermediate_size"] == len(report.channels_kept)
    cal = pc["calibration"]
    assert cal["num_samples"] == 8 and cal["seqlen"] == 32 and cal["seed"] == 0
    assert len(cal["sha256"]) == 64 and cal["dataset"] == "allenai/c4"
    assert {"torch", "transformers", "safetensors"} <= set(pc["versions"])
    assert pc["verification"] is None  # this fixture was exported with verify=False


@pytest.mark.parametrize("profile", ["hetero", "uniform"])
def test_model_card_metadata_parses_and_card_has_table_chart_and_snippet(exported, profile):
    _, folder = exported("gqa_balanced", profile)
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "slimgpt-tests/tiny-llama"
    assert data["license"] == "other"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert {"pruned", "slimgpt"} <= set(data["tags"])
    assert data["datasets"] == ["allenai/c4"]
    text = card.text
    assert "| parameters |" in text and "| perplexity" in text
    assert "pruning_chart.png" in text
    assert ("trust_remote_code=True" in text) == (profile == "hetero")
    assert "AutoModelForCausalLM.from_pretrained(" in text


def test_card_inherits_license_and_shows_perplexity(pruned, tmp_path):
    result, ids = pruned("mha")
    folder = tmp_path / "m"
    export(result, ids, folder, license="apache-2.0", repo_id="acme/tiny-slim",
           eval_metrics={"ppl_before": 12.25, "ppl_after": 14.5, "dataset": "wikitext-2"})
    card = ModelCard.load(folder / "README.md")
    assert card.data.to_dict()["license"] == "apache-2.0"
    assert "12.250" in card.text and "14.500" in card.text
    assert 'from_pretrained("acme/tiny-slim", trust_remote_code=True)' in card.text
    pc = json.loads((folder / "pruning_config.json").read_text())
    assert pc["evaluation"]["ppl_after"] == 14.5


def test_per_layer_chart_is_a_png(exported):
    _, folder = exported("gqa_free", "hetero")
    assert (folder / "pruning_chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokenizer_and_generation_config_are_written(exported):
    _, folder = exported("gqa_free", "hetero")
    assert (folder / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("w5 w7 w100").input_ids == tiny_tokenizer()("w5 w7 w100").input_ids


def test_uniform_profile_refuses_layers_of_different_widths(pruned, tmp_path):
    result, ids = pruned("gqa_balanced", "log")
    with pytest.raises(ExportError, match=r"schedule='uniform'"):
        export(result, ids, tmp_path / "u", profile="uniform")
    assert not (tmp_path / "u").exists()


def test_uniform_profile_refuses_irregular_kv_index():
    result, _ = make_pruned("gqa_balanced", "uniform")
    # same widths everywhere, but query heads read KV heads out of the grouped order
    for layer in result.model.model.layers:
        attn = layer.self_attn
        h = attn.q_proj.out_features // attn.head_dim
        set_attention_layout(attn, h, 2, [j % 2 for j in range(h)])
    with pytest.raises(ExportError, match="gqa_policy='balanced'"):
        export_config(result.model, "uniform")
    cfg = export_config(result.model, "hetero")
    assert cfg.layer_kv_index[0] == [j % 2 for j in range(cfg.layer_num_heads[0])]


def test_export_refuses_a_non_empty_folder(pruned, tmp_path):
    result, ids = pruned("mha")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export(result, ids, tmp_path / "busy")


def test_unknown_profile_is_rejected(pruned, tmp_path):
    result, ids = pruned("mha")
    with pytest.raises(ExportError, match="unknown export profile"):
        export(result, ids, tmp_path / "x", profile="gguf")
