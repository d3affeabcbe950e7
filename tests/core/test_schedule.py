"""Per-layer ratio schedules and the parameter target (torch-free arithmetic)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from slimgpt_core.schedule import (
    GQA_POLICIES,
    SCHEDULES,
    ModelShape,
    PlanError,
    estimate,
    make_plan,
    schedule_ratios,
)

SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30,
           "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
            "num_hidden_layers": 32, "intermediate_size": 11008, "vocab_size": 32000}
LLAMA_13B = {"model_type": "llama", "hidden_size": 5120, "num_attention_heads": 40,
             "num_hidden_layers": 40, "intermediate_size": 13824, "vocab_size": 32000}


@pytest.mark.parametrize("config", [SMOLLM2, LLAMA_7B, LLAMA_13B], ids=["30L", "32L", "40L"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("policy", GQA_POLICIES)
@pytest.mark.parametrize("target", [0.2, 0.5])
def test_plan_meets_parameter_target_within_one_percent(config, schedule, policy, target) -> None:
    plan = make_plan(ModelShape.from_config(config), target, schedule, policy)
    assert abs(plan.achieved_ratio - target) <= 0.01


def test_log_schedule_follows_the_paper_formula() -> None:
    n, r_last, alpha = 32, 0.3, 0.25
    rs = schedule_ratios("log", n, r_last, alpha)
    r0 = alpha * r_last
    for i, r in enumerate(rs):
        assert r == pytest.approx(r0 + (r_last - r0) * math.log(i + 1) / math.log(n))
    assert rs[0] == pytest.approx(r0) and rs[-1] == pytest.approx(r_last)


def test_log_schedule_uses_the_models_own_layer_count() -> None:
    plan = make_plan(ModelShape.from_config(SMOLLM2), 0.2, "log")
    assert len(plan.layer_ratios) == 30
    assert plan.layer_ratios[-1] == pytest.approx(plan.r_last)


def test_later_layers_are_pruned_more_under_log_schedule() -> None:
    plan = make_plan(ModelShape.from_config(LLAMA_7B), 0.2, "log")
    kept = [lp.params_after for lp in plan.layers]
    assert kept[0] > kept[-1]
    assert all(a >= b for a, b in zip(plan.layer_ratios[1:], plan.layer_ratios[:-1]))


def test_uniform_schedule_gives_identical_widths() -> None:
    plan = make_plan(ModelShape.from_config(SMOLLM2), 0.3, "uniform", "balanced")
    assert plan.is_uniform


def test_balanced_policy_removes_same_number_of_heads_per_group() -> None:
    plan = make_plan(ModelShape.from_config(SMOLLM2), 0.5, "uniform", "balanced")
    for lp in plan.layers:
        assert lp.kv_heads_kept == 3 and lp.heads_removed % 3 == 0


def test_group_policy_removes_whole_kv_groups() -> None:
    plan = make_plan(ModelShape.from_config(SMOLLM2), 0.5, "uniform", "group")
    for lp in plan.layers:
        assert lp.heads_removed == 3 * lp.kv_heads_removed


def test_policies_coincide_for_multi_head_attention() -> None:
    shape = ModelShape.from_config(LLAMA_7B)
    plans = [make_plan(shape, 0.2, "log", p).layers for p in GQA_POLICIES]
    assert plans[0] == plans[1] == plans[2]


def test_explicit_per_layer_ratios_are_used_as_given() -> None:
    ratios = [0.1] * 15 + [0.4] * 15
    plan = make_plan(ModelShape.from_config(SMOLLM2), 0.25, ratios)
    assert list(plan.layer_ratios) == ratios
    assert plan.schedule == "explicit"


def test_separate_head_and_ffn_ratios() -> None:
    plan = make_plan(ModelShape.from_config(LLAMA_7B), 0.2, "uniform", head_ratio=0.0,
                     ffn_ratio=0.5)
    assert all(lp.heads_removed == 0 and lp.channels_removed == 5504 for lp in plan.layers)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1])
def test_target_outside_open_unit_interval_is_rejected(target: float) -> None:
    with pytest.raises(PlanError, match="target ratio"):
        make_plan(ModelShape.from_config(SMOLLM2), target)


def test_explicit_schedule_of_wrong_length_is_rejected() -> None:
    with pytest.raises(PlanError, match="30 layers"):
        make_plan(ModelShape.from_config(SMOLLM2), 0.2, [0.2] * 29)


def test_unsupported_model_type_is_rejected_with_the_supported_list() -> None:
    with pytest.raises(PlanError, match="'gpt2' is not supported.*llama, mistral"):
        ModelShape.from_config({**SMOLLM2, "model_type": "gpt2"})


def test_config_missing_a_field_names_it() -> None:
    config = dict(SMOLLM2)
    del config["intermediate_size"]
    with pytest.raises(PlanError, match="intermediate_size"):
        ModelShape.from_config(config)


def test_parameter_count_matches_smollm2() -> None:
    shape = ModelShape.from_config(SMOLLM2)
    # SmolLM2-135M has 134,515,008 parameters (tied embeddings).
    assert shape.num_layers * shape.dense_layer_params + shape.non_layer_params == 134_515_008


def test_estimate_returns_a_json_ready_plan() -> None:
    out = estimate(SMOLLM2, 0.2)
    assert out["total_params_before"] == 134_515_008
    assert len(out["layers"]) == 30
    assert out["decoder_params_after"] < out["decoder_params_before"]


def test_schedule_module_does_not_import_torch() -> None:
    code = "import slimgpt_core, slimgpt_core.schedule, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plain_heads_keep_head_counts_that_divide_hidden_size() -> None:
    plan = make_plan(ModelShape.from_config(LLAMA_7B), 0.2, "uniform", plain_heads=True)
    assert abs(plan.achieved_ratio - 0.2) <= 0.01
    assert all(4096 % lp.heads_kept == 0 for lp in plan.layers)
