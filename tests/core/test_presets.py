"""Named presets (slimgpt_core.presets) and the one rule of which settings a model, placement
and GPU count can run (slimgpt_core.availability)."""

from __future__ import annotations

import copy
import typing

import pytest

from slimgpt_core.availability import unavailable
from slimgpt_core.errors import SettingUnavailableError
from slimgpt_core.families import family_for_config
from slimgpt_core.presets import PRESETS, preset_named, preset_settings
from slimgpt_core.pruner import PruneConfig, check_settings, prune_model
from tests.core.tiny import tiny_llama, windows

LLAMA = family_for_config({"model_type": "llama"})
OLMO2 = family_for_config({"model_type": "olmo2"})
MIXTRAL = family_for_config({"model_type": "mixtral"})
QUALITY = preset_settings("quality")


def test_the_standard_preset_is_the_librarys_defaults() -> None:
    assert PruneConfig(**preset_settings("standard")).fingerprint() == PruneConfig().fingerprint()


def test_the_quality_preset_is_the_best_measured_combination() -> None:
    config = PruneConfig(**QUALITY)
    assert (config.selection, config.fisher_samples, config.target, config.allocation) == (
        "fisher", 8, "dense", "sensitivity")


def test_preset_named_finds_a_preset_from_its_settings_only_when_they_match_exactly() -> None:
    assert preset_named(QUALITY) == "quality"
    assert preset_named({}) == "standard"
    assert preset_named({**QUALITY, "fisher_samples": 1}) is None


def test_an_unknown_preset_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="standard, quality"):
        preset_settings("best")


def test_the_api_offers_exactly_the_librarys_presets() -> None:
    from app.schemas import PruningSpec

    annotation = PruningSpec.model_fields["preset"].annotation
    assert set(typing.get_args(annotation)) == set(PRESETS)


def test_the_quality_preset_runs_on_a_dense_llama_resident_on_one_device() -> None:
    assert unavailable(QUALITY, LLAMA, placement="resident", world_size=1) is None
    assert unavailable({}, MIXTRAL, placement="stream", world_size=4) is None  # standard: all


@pytest.mark.parametrize(("family", "placement", "world_size", "needle"), [
    (LLAMA, "stream", 1, "stream placement"),
    (LLAMA, "host", 1, "resident"),
    (LLAMA, None, 2, "one GPU"),
    (OLMO2, None, 1, "normalises it first"),
    (MIXTRAL, None, 1, "mixture-of-experts"),
])
def test_the_quality_preset_is_refused_where_it_cannot_run(family, placement, world_size,
                                                           needle) -> None:
    why = unavailable(QUALITY, family, placement=placement, world_size=world_size)
    assert why is not None and needle in why


def test_unknown_family_or_placement_is_not_held_against_a_setting() -> None:
    assert unavailable(QUALITY, None) is None


def test_check_settings_refuses_before_the_pruner_starts() -> None:
    from tests.core.family_cases import tiny_model

    model = tiny_model("olmo2")
    with pytest.raises(SettingUnavailableError, match="normalises it first"):
        check_settings(model, PruneConfig(**QUALITY))
    check_settings(model, PruneConfig())  # the standard preset runs on it


def test_the_pruner_refuses_what_check_settings_refuses_with_the_same_error() -> None:
    base, ids = tiny_llama(layers=2), windows(4, 16)
    config = PruneConfig(target_ratio=0.3, **QUALITY)
    with pytest.raises(SettingUnavailableError, match="one GPU"):
        check_settings(base, config, world_size=2)
    with pytest.raises(SettingUnavailableError, match="stream placement"):
        check_settings(base, config, streamed=True)
    result = prune_model(copy.deepcopy(base), ids, PruneConfig(target_ratio=0.3, min_group=8,
                                                               **QUALITY))
    assert result.settings["selection"] == "fisher" and result.settings["fisher_samples"] == 8


def test_the_thorough_preset_is_quality_with_its_widths_refined_by_search() -> None:
    assert preset_settings("thorough") == {**QUALITY, "allocation": "search"}


def test_thorough_is_refused_before_any_pass_where_its_levels_cannot_fit(monkeypatch) -> None:
    """The levels are sized from the shape: a model whose every layer's weights at many
    widths overfill the device fails before the Fisher, naming the preset that runs."""
    from slimgpt_core import alloc_search

    monkeypatch.setattr(alloc_search, "CPU_LEVEL_BYTES", 4096)
    base, ids = tiny_llama(layers=2), windows(4, 16)
    config = PruneConfig(target_ratio=0.3, min_group=8, **preset_settings("thorough"))
    with pytest.raises(SettingUnavailableError, match="allocation 'sensitivity'") as refused:
        check_settings(base, config)
    assert refused.value.fallback == "quality"
    events = []
    with pytest.raises(SettingUnavailableError):
        prune_model(copy.deepcopy(base), ids, config, progress=events.append)
    assert events == []


def test_thorough_runs_where_its_levels_fit() -> None:
    base, ids = tiny_llama(layers=2), windows(4, 16)
    config = PruneConfig(target_ratio=0.3, min_group=8, search_generations=4,
                         **preset_settings("thorough"))
    check_settings(base, config)
    result = prune_model(copy.deepcopy(base), ids, config)
    assert result.plan.schedule == "search" and result.allocation_search is not None
