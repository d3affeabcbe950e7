"""The model card is a huggingface_hub ModelCard: its metadata parses back with the Hub's own
parser (base model and relation, Hub dataset ids, model-index with the measured perplexity),
and its text says how the model was made and how to load and serve each profile."""

from __future__ import annotations

from huggingface_hub import ModelCard

from slimgpt_core.model_card import render_model_card

PRUNING = {"params_before": 134_515_008, "params_after": 107_612_006, "target_ratio": 0.2,
           "achieved_ratio": 0.2012, "schedule": "log", "gqa_policy": "balanced",
           "layer_ratios": [0.05, 0.1, 0.3], "architecture": "LlamaForCausalLM",
           "verification": {"windows": 2, "max_abs_diff": 1e-5, "tolerance": 1e-3}}
CALIBRATION = {"source": "c4", "dataset": "allenai/c4", "config": "en", "split": "train",
               "num_samples": 128, "seqlen": 2048, "seed": 0, "sha256": "ab" * 32}
WIKITEXT = {"ppl_before": 20.5, "ppl_after": 27.25, "source": "wikitext2",
            "dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test",
            "windows": 16, "seq_len": 512, "tokens": 8192}


def _card(tmp_path, profile="hetero", evaluation=WIKITEXT, base="HuggingFaceTB/SmolLM2-135M"):
    text = render_model_card(base_model_id=base, base_revision="abc123", license="apache-2.0",
                             profile=profile, pruning=PRUNING, calibration=CALIBRATION,
                             eval_metrics=evaluation, library_version="0.1.0",
                             repo_or_path="my-org/SmolLM2-135M-slim20")
    path = tmp_path / "README.md"
    path.write_text(text)
    return ModelCard.load(path), text


def test_card_metadata_parses_with_the_hubs_parser(tmp_path):
    card, _ = _card(tmp_path)
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert data.to_dict()["base_model_relation"] == "pruned"
    assert data.datasets == ["allenai/c4", "Salesforce/wikitext"]
    assert data.license == "apache-2.0" and data.pipeline_tag == "text-generation"
    (result,) = data.eval_results
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == (
        "Salesforce/wikitext", "wikitext-2-raw-v1", "test")
    assert (result.metric_type, result.metric_value) == ("perplexity", 27.25)
    assert "16 windows of 512 tokens" in result.metric_name
    assert data.model_name == "SmolLM2-135M-slim20"


def test_card_text_has_results_recipe_loading_and_serving(tmp_path):
    _, text = _card(tmp_path)
    assert "20.500" in text and "27.250" in text and "Salesforce/wikitext, 16 x 512" in text
    assert ("slimgpt prune --model HuggingFaceTB/SmolLM2-135M --out DIR --revision abc123 "
            "--ratio 0.2 --schedule log") in text
    assert ("slimgpt submit --model HuggingFaceTB/SmolLM2-135M --revision abc123 --ratio 0.2"
            in text and "--calib-source c4" in text)
    assert "--nsamples 128 --seqlen 2048 --seed 0" in text
    assert "`allenai/c4` (en, train)" in text
    assert 'from_pretrained("my-org/SmolLM2-135M-slim20", trust_remote_code=True)' in text
    assert "vllm serve my-org/SmolLM2-135M-slim20" in text
    _, uniform = _card(tmp_path, profile="uniform")
    assert "trust_remote_code" not in uniform.split("## Serving")[0].split("## Loading")[1]


def test_an_uploaded_evaluation_file_is_in_the_table_but_not_in_model_index(tmp_path):
    upload = {"ppl_before": 20.5, "ppl_after": 27.25, "source": "upload", "windows": 4,
              "seq_len": 32, "sha256": "cd" * 32}
    card, text = _card(tmp_path, evaluation=upload)
    assert card.data.eval_results is None and card.data.datasets == ["allenai/c4"]
    assert "an uploaded file, 4 x 32 tokens" in text


def test_a_local_base_model_has_no_base_model_metadata(tmp_path):
    card, _ = _card(tmp_path, base="tiny4")
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()


def test_zero_shot_accuracy_on_a_hub_task_is_in_model_index_and_the_table(tmp_path):
    zero_shot = {"arc_easy": {"acc": 0.6123, "acc_norm": 0.5891, "samples": 2376,
                              "dataset": "allenai/ai2_arc", "config": "ARC-Easy",
                              "split": "test", "num_fewshot": 0}}
    text = render_model_card(base_model_id="HuggingFaceTB/SmolLM2-135M", base_revision=None,
                             license="apache-2.0", profile="hetero",
                             pruning={**PRUNING, "zero_shot": zero_shot},
                             calibration=CALIBRATION, eval_metrics=WIKITEXT,
                             library_version="0.1.0")
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    results = {(r.dataset_type, r.metric_type): r for r in card.data.eval_results}
    acc = results["allenai/ai2_arc", "acc"]
    assert (acc.metric_value, acc.dataset_config, acc.dataset_split) == (0.6123, "ARC-Easy",
                                                                         "test")
    assert "2376 examples, 0-shot" in acc.metric_name
    assert results["allenai/ai2_arc", "acc_norm"].metric_value == 0.5891
    assert ("Salesforce/wikitext", "perplexity") in results
    assert "allenai/ai2_arc" in card.data.datasets
    assert "| zero-shot arc_easy acc (allenai/ai2_arc, 2376 examples; lm-eval) | – | 0.6123 |" in text
