"""The model card's recipe is complete: read back with huggingface_hub's ModelCard parser, it
alone re-runs the same pruning (the same weights), and its `slimgpt prune` command line parses
to the same settings."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import pytest
import torch
import typer
from _export_helpers import CASES, VOCAB, export
from huggingface_hub import ModelCard

from slimgpt_core.cli import _prune_config, check_args
from slimgpt_core.cli_args import add_prune_command
from slimgpt_core.export import describe_calibration
from slimgpt_core.heal import HealConfig, heal_settings
from slimgpt_core.model_card import RECIPE_DEFAULTS, recipe_commands
from slimgpt_core.pruner import PruneConfig, prune_model

# Every setting away from its default, so that a recipe missing one re-runs differently.
SETTINGS = {"target_ratio": 0.35, "schedule": "linear", "alpha": 0.5, "gqa_policy": "group",
            "percdamp": 0.05, "min_group": 8, "max_group": 1024, "seed": 3,
            "local_search": 2}


def tiny_model():
    config_cls, model_cls, heads, kv, _ = CASES["mistral"]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=256,
                     num_hidden_layers=3, num_attention_heads=heads, num_key_value_heads=kv,
                     head_dim=16, max_position_embeddings=128)
    return model_cls(cfg).eval()


def calibration_ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def card_and_result(tmp_path_factory):
    ids = calibration_ids(SETTINGS["seed"])
    result = prune_model(tiny_model(), ids, PruneConfig(**SETTINGS, batch_size=4))
    folder = tmp_path_factory.mktemp("recipe") / "model"
    heal = heal_settings(HealConfig(tokens=4096, mode="lora", seed=3), windows=4,
                         window_seed=4, seqlen=32)
    export(result, ids, folder, heal=heal, calibration_info=describe_calibration(
        ids, source="calib.txt", seed=SETTINGS["seed"]))
    return ModelCard.load(folder / "README.md"), result, ids


def test_the_cards_recipe_parses_and_names_every_setting_that_decides_the_weights(
        card_and_result):
    card, _, ids = card_and_result
    recipe = card.data.to_dict()["slimgpt_recipe"]
    assert set(recipe["pruning"]) == set(RECIPE_DEFAULTS)
    assert {k: recipe["pruning"][k] for k in SETTINGS} == SETTINGS
    assert recipe["base_model"] == "slimgpt-tests/tiny-llama"
    assert recipe["base_revision"] == "abc123"
    assert recipe["profile"] == "hetero" and recipe["dtype"] == "float32"
    assert recipe["calibration"]["sha256"] == describe_calibration(ids, source="x")["sha256"]
    assert recipe["calibration"]["num_samples"] == 8 and recipe["calibration"]["seqlen"] == 32
    assert recipe["heal"] == {"mode": "lora", "tokens": 4096, "lr": 2e-4, "batch_size": 4,
                              "hidden_weight": 0.0, "temperature": 1.0, "seed": 3,
                              "windows": 4, "window_seed": 4, "seqlen": 32, "rank": 16}


def test_the_recipe_alone_re_runs_the_same_pruning(card_and_result):
    card, result, ids = card_and_result
    recipe = card.data.to_dict()["slimgpt_recipe"]
    assert describe_calibration(ids, source="x")["sha256"] == recipe["calibration"]["sha256"]
    again = prune_model(tiny_model(), ids, PruneConfig(**recipe["pruning"], batch_size=4))
    for a, b in zip(result.layers, again.layers, strict=True):
        assert (a.heads_kept, a.channels_kept) == (b.heads_kept, b.channels_kept)
    first, second = result.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_cards_prune_command_parses_to_the_recipes_settings(card_and_result, tmp_path):
    card, _, _ = card_and_result
    recipe = card.data.to_dict()["slimgpt_recipe"]
    line = recipe_commands(recipe)["prune"]
    assert line in card.text  # the card shows this exact command
    argv = shlex.split(line.replace("DIR", str(tmp_path / "out")))[2:]
    app = typer.Typer()
    add_prune_command(app)  # `slimgpt prune`'s own options and parser
    params = typer.main.get_command(app).make_context("prune", argv).params
    params = {k: getattr(v, "value", v) for k, v in params.items()}  # enum choices
    args = SimpleNamespace(**params)
    config = _prune_config(args, check_args(args), torch.device("cpu"))
    assert config.fingerprint() == {k: v for k, v in recipe["pruning"].items()
                                    if k in config.fingerprint()}
    assert params["calib"] == "calib.txt" and params["seed"] == 3 and params["heal"]
    assert args.dtype == "float32" and params["revision"] == "abc123"
    assert recipe_commands(recipe)["submit"] is None  # local search: not a service setting


def test_a_service_recipe_has_the_submit_command_with_the_hub_calibration_source():
    recipe = {"base_model": "org/base", "base_revision": None, "profile": "uniform",
              "pruning": {**RECIPE_DEFAULTS, "target_ratio": 0.2, "schedule": "uniform",
                          "gqa_policy": "balanced", "percdamp": 0.02},
              "calibration": {"source": "c4", "num_samples": 64, "seqlen": 512, "seed": 1},
              "dtype": "bfloat16", "heal": {"mode": "full", "tokens": 5000}}
    submit = recipe_commands(recipe)["submit"]
    assert submit is not None
    for part in ("--model org/base", "--ratio 0.2", "--schedule uniform", "--percdamp 0.02",
                 "--profile uniform", "--nsamples 64", "--seqlen 512", "--seed 1",
                 "--calib-source c4", "--heal --heal-tokens 5000 --heal-mode full"):
        assert part in submit


def test_a_moe_few_token_threshold_is_a_local_only_recipe_setting():
    recipe = {"base_model": "org/moe", "base_revision": None, "profile": "hetero",
              "pruning": {**RECIPE_DEFAULTS, "target_ratio": 0.2, "expert_min_tokens": 64},
              "calibration": {"source": "c4", "num_samples": 64, "seqlen": 512, "seed": 1}}
    commands = recipe_commands(recipe)
    assert "--expert-min-tokens 64" in commands["prune"]
    assert commands["submit"] is None


def test_a_named_presets_settings_give_a_service_command_with_the_preset():
    from slimgpt_core.presets import preset_settings

    recipe = {"base_model": "org/m", "base_revision": None, "profile": "hetero",
              "pruning": {**RECIPE_DEFAULTS, "target_ratio": 0.2,
                          **preset_settings("quality")},
              "calibration": {"source": "c4", "num_samples": 64, "seqlen": 512, "seed": 1}}
    commands = recipe_commands(recipe)
    assert "--selection fisher" in commands["prune"] and "--fisher-samples 8" in commands["prune"]
    assert commands["submit"] is not None and "--preset quality" in commands["submit"]
    # One setting off the preset: only the local command can repeat it.
    recipe["pruning"]["fisher_samples"] = 1
    assert recipe_commands(recipe)["submit"] is None
