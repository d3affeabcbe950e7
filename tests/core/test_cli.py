"""`slimgpt prune` from the command line, on a tiny local model folder."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from app.cli import main
from tests.core.tiny import tiny_llama
from tests.export._export_helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _text(path: Path, words: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randrange(3, 128)}" for _ in range(words)))
    return path


def _args(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model_dir), "--ratio", "0.3",
            "--calib", str(_text(tmp_path / "calib.txt", 2000, 0)),
            "--eval", str(_text(tmp_path / "eval.txt", 500, 1)), "--eval-windows", "2",
            "--out", str(tmp_path / "out"), "--nsamples", "4", "--seqlen", "32",
            "--min-group", "8", "--device", "cpu", *extra]


def test_prune_writes_a_verified_folder_and_reports_sizes(model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    assert main(_args(model_dir, tmp_path, "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params_after"] < summary["params_before"]
    assert summary["perplexity_before"] > 0 and summary["perplexity_after"] > 0
    out = tmp_path / "out"
    pruning = json.loads((out / "pruning_config.json").read_text())
    assert pruning["verification"]["passed"] is True
    assert not list(out.glob("*.bin"))


def test_uniform_profile_writes_a_plain_llama_config(model_dir: Path, tmp_path: Path) -> None:
    assert main(_args(model_dir, tmp_path, "--profile", "uniform", "--no-verify")) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config


@pytest.mark.parametrize("ratio", ["0", "0.95", "-1"])
def test_ratio_outside_range_is_a_usage_error(model_dir: Path, tmp_path: Path,
                                              ratio: str, capsys: pytest.CaptureFixture) -> None:
    args = _args(model_dir, tmp_path)
    args[args.index("--ratio") + 1] = ratio
    assert main(args) == 2
    assert "--ratio" in capsys.readouterr().err


def test_uniform_profile_with_log_schedule_is_a_usage_error(model_dir: Path,
                                                            tmp_path: Path) -> None:
    assert main(_args(model_dir, tmp_path, "--profile", "uniform", "--schedule", "log")) == 2


def test_existing_non_empty_output_is_refused(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(_args(model_dir, tmp_path)) == 2
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_heal_flag_distils_and_reports_it(model_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    assert main(_args(model_dir, tmp_path, "--heal", "--heal-tokens", "256", "--no-verify",
                      "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["heal"]["mode"] == "lora" and summary["heal"]["steps"] == 256 // (4 * 32)
    # The card's recipe says the model was healed, and how (its settings decide the weights).
    from huggingface_hub import ModelCard

    recipe = ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()["slimgpt_recipe"]
    assert recipe["heal"] == summary["heal"]["settings"]
    assert recipe["heal"]["tokens"] == 256 and recipe["heal"]["mode"] == "lora"


def test_default_gqa_policy_follows_the_profile(model_dir: Path, tmp_path: Path) -> None:
    assert main(_args(model_dir, tmp_path, "--no-verify")) == 0
    pruning = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert pruning["gqa_policy"] == "free"


def test_past_paper_options_reach_the_pruner(model_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    assert main(_args(model_dir, tmp_path, "--target", "dense", "--local-search", "2",
                      "--no-verify")) == 0
    settings = json.loads((tmp_path / "out" / "pruning_config.json").read_text())["settings"]
    assert settings["target"] == "dense" and settings["local_search"] == 2


def test_fisher_label_draws_reach_the_pruner(model_dir: Path, tmp_path: Path) -> None:
    assert main(_args(model_dir, tmp_path, "--selection", "fisher", "--fisher-samples", "2",
                      "--no-verify")) == 0
    settings = json.loads((tmp_path / "out" / "pruning_config.json").read_text())["settings"]
    assert settings["selection"] == "fisher" and settings["fisher_samples"] == 2

def test_the_pruning_time_printed_counts_the_passes_before_the_layers(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_args(model_dir, tmp_path, "--selection", "fisher", "--allocation",
                      "sensitivity", "--no-verify")) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines()
               if x.startswith("pruning time:")]
    seconds = json.loads((tmp_path / "out" / "pruning_config.json").read_text())[
        "prune_seconds"]
    printed = re.fullmatch(r"pruning time: ([\d.]+) s \(of it fisher ([\d.]+) s, "
                           r"allocation ([\d.]+) s\)", line)
    assert printed is not None, line
    whole, fisher, allocation = (float(x) for x in printed.groups())
    assert fisher == pytest.approx(seconds["fisher"], abs=0.06)
    assert allocation == pytest.approx(seconds["allocation"], abs=0.06)
    assert whole == pytest.approx(seconds["total"] + seconds["fisher"] + seconds["allocation"],
                                  abs=0.1)


def test_search_allocation_reaches_the_pruner_and_its_model_verifies(model_dir: Path,
                                                                     tmp_path: Path) -> None:
    assert main(_args(model_dir, tmp_path, "--allocation", "search",
                      "--search-generations", "12")) == 0
    pruning = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert pruning["settings"]["allocation"] == "search"
    assert pruning["recipe"]["pruning"]["search_generations"] == 12
    assert "--allocation search --search-generations 12" in (
        tmp_path / "out" / "README.md").read_text()
    assert pruning["verification"]["passed"]
    assert pruning["allocation_search"]["final_kl"] <= pruning["allocation_search"]["start_kl"]


def test_the_quality_preset_sets_its_options_and_a_flag_overrides_one(model_dir: Path,
                                                                     tmp_path: Path) -> None:
    assert main(_args(model_dir, tmp_path, "--preset", "quality", "--fisher-samples", "2",
                      "--no-verify")) == 0
    settings = json.loads((tmp_path / "out" / "pruning_config.json").read_text())["settings"]
    assert (settings["selection"], settings["target"], settings["allocation"]) == (
        "fisher", "dense", "sensitivity")
    assert settings["fisher_samples"] == 2


def test_the_quality_preset_with_stream_is_a_usage_error(model_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert main(_args(model_dir, tmp_path, "--preset", "quality", "--stream")) == 2
    assert "stream placement" in capsys.readouterr().err


def test_stream_flag_prunes_from_the_shards_into_a_verified_folder(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_args(model_dir, tmp_path, "--stream", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tmp_path / "out"
    pruning = json.loads((out / "pruning_config.json").read_text())
    assert pruning["verification"]["passed"] and pruning["verification"]["streamed"]
    assert summary["perplexity_before"] > 0 and summary["perplexity_after"] > 0
    assert (out / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.layers")]


def test_stream_gives_the_same_model_and_perplexities_as_in_memory(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from slimgpt_core.shards import ShardedCheckpoint

    args = _args(model_dir, tmp_path, "--json", "--no-verify")
    assert main(args) == 0
    memory = json.loads(capsys.readouterr().out)
    streamed_args = [a if a != str(tmp_path / "out") else str(tmp_path / "out2") for a in args]
    assert main([*streamed_args, "--stream"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert streamed["perplexity_before"] == pytest.approx(memory["perplexity_before"], rel=1e-5)
    assert streamed["perplexity_after"] == pytest.approx(memory["perplexity_after"], rel=1e-5)
    a, b = ShardedCheckpoint(tmp_path / "out"), ShardedCheckpoint(tmp_path / "out2")
    assert set(a.tensors) == set(b.tensors)
    for key in a.tensors:
        assert (a.read(key) == b.read(key)).all(), key


def test_dry_run_prints_resources_per_gpu_without_loading_weights(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = next(model_dir.glob("*.safetensors"))
    saved = weights.read_bytes()
    weights.write_bytes(b"not weights")  # a dry run must not read them
    try:
        code = main(["prune", "--model", str(model_dir), "--ratio", "0.3", "--dry-run", "--json",
                     "--host-memory-gb", "64"])
    finally:
        weights.write_bytes(saved)
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    h200 = [e for e in doc["estimates"] if e["gpu_type"] == "h200"]
    assert [e["gpus"] for e in h200] == [1, 2, 4, 8]
    assert all(e["fits"] and e["peak_gpu_gb"] > 0 and e["predicted_s"] > 0 for e in h200)


def test_dry_run_of_the_quality_preset_says_what_its_estimate_does_not_show(
        model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prune", "--model", str(model_dir), "--ratio", "0.3", "--dry-run", "--json",
                 "--preset", "quality"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert len(notes) == 1 and "preset 'quality'" in notes[0]


def test_dry_run_of_a_preset_the_family_cannot_run_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.core.family_cases import tiny_model

    tiny_model("olmo2").config.save_pretrained(tmp_path / "olmo2")
    assert main(["prune", "--model", str(tmp_path / "olmo2"), "--ratio", "0.3", "--dry-run",
                 "--preset", "quality"]) == 2
    assert "normalises it first" in capsys.readouterr().err


def test_a_dead_gpu_rank_is_a_clear_error_that_says_how_to_resume(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import slimgpt_core.multi_gpu
    from slimgpt_core.errors import RankFailed

    def rank_dies(*_args: object, **_kwargs: object) -> None:
        raise RankFailed("helper rank 1 (pid 42) was killed by SIGKILL", rank=1,
                         cause="was killed by SIGKILL")

    monkeypatch.setattr(slimgpt_core.multi_gpu, "prune_streamed", rank_dies)
    assert main(_args(model_dir, tmp_path, "--stream")) == 1
    err = capsys.readouterr().err
    assert "helper rank 1 (pid 42) was killed by SIGKILL" in err
    assert "--checkpoint-dir" in err and ".out.layers-" in err


def test_dry_run_with_a_time_budget_uses_the_cost_models_choice(
        model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from slimgpt_core.costs import calibration_for_budget
    from slimgpt_core.schedule import ModelShape, make_plan

    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    plan = make_plan(shape, 0.3, "log", "free")
    expected = calibration_for_budget(shape, plan, 0.366, seq_len=512)
    assert main(["prune", "--model", str(model_dir), "--ratio", "0.3", "--dry-run", "--json",
                 "--host-memory-gb", "64", "--seqlen", "512", "--calib-budget", "0.366"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration_windows"] == expected
    assert main(["prune", "--model", str(model_dir), "--ratio", "0.3", "--dry-run",
                 "--seqlen", "512", "--calib-budget", "0.01"]) == 2
    assert "not even 8 windows" in capsys.readouterr().err


def test_a_time_budget_without_a_known_gpu_is_a_usage_error(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_args(model_dir, tmp_path, "--calib-budget", "60")) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
