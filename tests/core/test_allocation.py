"""Sensitivity allocation: the schedule's totals, redistributed by measured error curves."""

from __future__ import annotations

import copy

import pytest

from slimgpt_core.allocation import LayerCurves, allocate
from slimgpt_core.pruner import PruneConfig, prune_model
from slimgpt_core.schedule import ModelShape, make_plan
from tests.core.tiny import tiny_llama, windows

SHAPE = ModelShape(num_layers=4, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                   intermediate_size=1536, vocab_size=1000)


def _curves(head_scale: list[float], chan_scale: list[float]) -> list[LayerCurves]:
    """Convex curves: cost grows quadratically with what is removed, times a layer scale."""
    return [LayerCurves([hs * u * u for u in range(7)],
                        [(c, cs * (c / 64) ** 2) for c in range(0, 1409, 64)])
            for hs, cs in zip(head_scale, chan_scale)]


def test_allocation_keeps_the_parameter_count_of_the_schedule() -> None:
    base = make_plan(SHAPE, 0.3, "log", "free")
    plan = allocate(base, _curves([1, 1, 1, 1], [1, 1, 1, 1]), "free")
    assert plan.decoder_params_after == base.decoder_params_after
    assert all(lp.channels_removed % 8 == 0 for lp in plan.layers)
    assert all(lp.kv_heads_kept == 3 for lp in plan.layers)


def test_a_sensitive_layer_is_pruned_less() -> None:
    base = make_plan(SHAPE, 0.3, "uniform", "free")
    plan = allocate(base, _curves([1, 50, 1, 1], [1, 50, 1, 1]), "free")
    removed = [lp.params_before - lp.params_after for lp in plan.layers]
    assert removed[1] < min(removed[0], removed[2], removed[3])


def test_cheap_heads_are_traded_for_channels_in_equal_packets() -> None:
    base = make_plan(SHAPE, 0.3, "uniform", "free")
    plan = allocate(base, _curves([0.001] * 4, [100] * 4), "free")
    heads = sum(lp.heads_removed for lp in plan.layers)
    base_heads = sum(lp.heads_removed for lp in base.layers)
    assert heads > base_heads and (heads - base_heads) % 3 == 0
    assert plan.decoder_params_after == base.decoder_params_after


def test_balanced_allocation_moves_whole_rounds_of_heads() -> None:
    base = make_plan(SHAPE, 0.3, "uniform", "balanced")
    plan = allocate(base, _curves([1, 9, 1, 1], [1, 1, 1, 1]), "balanced")
    assert all(lp.heads_removed % 3 == 0 for lp in plan.layers)
    assert plan.decoder_params_after == base.decoder_params_after


def test_sensitivity_allocation_prunes_to_the_estimated_size() -> None:
    base = tiny_llama(layers=4)
    ids = windows(8, 32)
    schedule = prune_model(copy.deepcopy(base), ids, PruneConfig(
        target_ratio=0.4, gqa_policy="free", batch_size=4, min_group=8))
    sensitive = prune_model(copy.deepcopy(base), ids, PruneConfig(
        target_ratio=0.4, gqa_policy="free", batch_size=4, min_group=8,
        allocation="sensitivity"))
    assert sensitive.params_after == schedule.params_after
    assert sensitive.plan.schedule == "sensitivity"
    assert [len(r.heads_kept) for r in sensitive.layers] == [
        lp.heads_kept for lp in sensitive.plan.layers]


def test_group_policy_cannot_be_allocated() -> None:
    from slimgpt_core.schedule import PlanError

    base = make_plan(SHAPE, 0.3, "uniform", "group")
    with pytest.raises(PlanError, match="free' or 'balanced"):
        allocate(base, _curves([1] * 4, [1] * 4), "group")


def test_the_head_channel_split_can_move_far_from_the_schedule() -> None:
    # Heads nearly free, channels dear: every head the curves allow goes (6 per layer: each
    # KV group keeps one query head), many more 3-head packets than a window around the
    # schedule's split would reach.
    shape = ModelShape(num_layers=12, hidden_size=576, num_heads=9, num_kv_heads=3,
                       head_dim=64, intermediate_size=1536, vocab_size=1000)
    base = make_plan(shape, 0.3, "uniform", "free")
    assert 6 * 12 - sum(lp.heads_removed for lp in base.layers) > 3 * 8
    plan = allocate(base, [LayerCurves([1e-6 * u for u in range(7)],
                                       [(c, 100 * (c / 64) ** 2) for c in range(0, 1409, 64)])
                           for _ in range(12)], "free")
    assert all(lp.heads_removed == 6 for lp in plan.layers)
    assert plan.decoder_params_after == base.decoder_params_after
