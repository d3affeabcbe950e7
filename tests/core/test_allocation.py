"""Sensitivity allocation: the schedule's totals, redistributed by measured error curves."""

from __future__ import annotations

import copy
from itertools import pairwise

import pytest
import torch

from slimgpt_core.allocation import (
    LayerCurves,
    _weighted_error,
    allocate,
    channel_curve,
    head_curve,
)
from slimgpt_core.obs import damped_inverse, group_errors, remove_group
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


def test_group_policy_moves_whole_kv_groups_with_their_kv_head() -> None:
    base = make_plan(SHAPE, 0.3, "uniform", "group")
    curves = [LayerCurves([hs * u * u for u in range(3)],
                          [(c, (c / 64) ** 2) for c in range(0, 1409, 64)])
              for hs in (1, 30, 1, 1)]
    plan = allocate(base, curves, "group")
    assert plan.decoder_params_after == base.decoder_params_after
    assert all(lp.heads_removed == 3 * lp.kv_heads_removed for lp in plan.layers)
    assert all(lp.kv_heads_kept == 3 - lp.kv_heads_removed for lp in plan.layers)
    assert plan.layers[1].heads_removed < max(lp.heads_removed for lp in plan.layers)


MHA = ModelShape(num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=8, head_dim=64,
                 intermediate_size=1376, vocab_size=1000)


@pytest.mark.parametrize("policy", ["free", "balanced"])
def test_multi_head_allocation_removes_each_head_with_its_kv_head(policy: str) -> None:
    base = make_plan(MHA, 0.4, "log", policy)
    assert any(lp.kv_heads_removed for lp in base.layers)  # what the plan itself does
    curves = [LayerCurves([hs * u * u for u in range(8)],
                          [(c, (c / 64) ** 2) for c in range(0, 1305, 8)])
              for hs in (0.01, 0.01, 5, 5)]
    plan = allocate(base, curves, policy)
    assert plan.decoder_params_after == base.decoder_params_after
    assert all(lp.kv_heads_removed == lp.heads_removed for lp in plan.layers)
    assert all(lp.heads_kept == lp.kv_heads_kept >= 1 for lp in plan.layers)
    heads = [lp.heads_removed for lp in plan.layers]
    assert min(heads[:2]) > max(heads[2:])  # cheap heads go first


def test_free_policy_refuses_a_plan_that_empties_kv_groups() -> None:
    from slimgpt_core.schedule import PlanError

    base = make_plan(SHAPE, 0.9, "uniform", "free")
    assert any(lp.kv_heads_removed for lp in base.layers)
    with pytest.raises(PlanError, match="keeps every KV head"):
        allocate(base, _curves([1] * 4, [1] * 4), "free")


def test_multi_head_model_prunes_to_the_estimated_size() -> None:
    from slimgpt_core.schedule import estimate

    base = tiny_llama(num_heads=8, num_kv_heads=8, layers=4, head_dim=8)
    ids = windows(8, 32)
    result = prune_model(copy.deepcopy(base), ids, PruneConfig(
        target_ratio=0.4, batch_size=4, min_group=8, allocation="sensitivity"))
    dry_run = estimate(base.config.to_dict(), 0.4)
    assert result.plan.schedule == "sensitivity"
    assert result.params_after - result.plan.shape.non_layer_params == \
        dry_run["decoder_params_after"] == result.plan.decoder_params_after
    assert [len(r.kv_heads_kept) for r in result.layers] == [
        len(r.heads_kept) for r in result.layers] == [
        lp.heads_kept for lp in result.plan.layers]
    assert [lp.heads_kept for lp in result.plan.layers] != [
        lp["heads_kept"] for lp in dry_run["layers"]]  # the allocation did move heads


# -- curves: the accumulated error is the error of the compensated weights -------------------
def _layer(out: int, inp: int, seed: int, dead: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(inp, 4 * inp, generator=g) * torch.rand(inp, 1, generator=g)
    X[:dead] = 0.0  # input channels that never fire
    W = torch.randn(out, inp, generator=g)
    weight = torch.rand(out, generator=g) + 0.1
    return W, 2 * X @ X.T / X.shape[1], weight


def _reference_curve(W, H, weight, steps):
    """Greedy OBS steps (``steps(W, hinv)`` yields each group), full ``dW H dW^T`` each time."""
    inv = damped_inverse(H, 0.01)
    W0 = W.clone()
    W0[:, inv.dead] = 0.0
    Wc, hinv = W0.clone(), inv.hinv
    out = [0.0]
    for group in steps(Wc, hinv):
        remove_group(Wc, hinv, group)
        out.append(_weighted_error(W0, Wc, H, weight))
    return out


@pytest.mark.parametrize("dead", [0, 3])
def test_channel_curve_costs_are_the_weighted_output_errors_of_the_compensated_weights(
        dead: int) -> None:
    W, H, weight = _layer(24, 64, seed=dead, dead=dead)
    curve = channel_curve(W, H, weight, max_channels=50, percdamp=0.01, min_group=4,
                          max_group=16)

    def steps(Wc, hinv):
        alive = torch.ones(W.shape[1], dtype=torch.bool)
        for (c0, _), (c1, _) in pairwise(curve):
            scores = (Wc.pow(2).sum(0) / torch.diagonal(hinv)).masked_fill(~alive, float("inf"))
            group = torch.argsort(scores, stable=True)[:c1 - c0]
            alive[group] = False
            yield group

    expected = _reference_curve(W, H, weight, steps)
    assert curve[-1][0] == 50 and len(curve) > 3
    assert [c for c, _ in curve] == sorted({c for c, _ in curve})
    assert [e for _, e in curve] == pytest.approx(expected, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize(("heads", "kv"), [(8, 2), (6, 6)])
def test_head_curve_costs_are_the_weighted_output_errors_of_the_compensated_weights(
        heads: int, kv: int) -> None:
    hd = 4
    W, H, weight = _layer(16, heads * hd, seed=heads)
    curve = head_curve(W, H, weight, num_heads=heads, num_kv_heads=kv, head_dim=hd,
                       max_units=heads, policy="free", percdamp=0.01)
    gs = heads // kv
    # free: never a KV group's last head; multi-head: any head but the last one
    assert len(curve) - 1 == (heads - kv if gs > 1 else kv - 1)

    def steps(Wc, hinv):
        alive = torch.ones(heads, dtype=torch.bool)
        per_group = torch.zeros(kv, dtype=torch.long)
        cols = torch.arange(heads * hd).view(heads, hd)
        for _ in range(len(curve) - 1):
            ok = alive & ((per_group[torch.arange(heads) // gs] < gs - 1) if gs > 1 else True)
            cand = ok.nonzero().squeeze(1)
            best = cand[int(torch.argmin(group_errors(Wc, hinv, cols[cand])))]
            alive[best] = False
            per_group[best // gs] += 1
            yield cols[best]

    assert curve == pytest.approx(_reference_curve(W, H, weight, steps), rel=1e-3, abs=1e-4)


def test_curves_and_loss_weights_see_only_their_first_windows() -> None:
    from slimgpt_core.allocation import sensitivity_plan
    from slimgpt_core.pruner import model_family, model_shape

    model = tiny_llama(layers=3)
    ids = windows(8, 32)
    base = make_plan(model_shape(model), 0.4, "log", "free")

    def plan(calibration, **windows_kw):
        return sensitivity_plan(model, calibration, base, "free", 0.01, 8, 64, 4,
                                torch.device("cpu"), model_family(model), **windows_kw)

    subset = plan(ids, sensitivity_windows=2, curve_windows=4)
    assert subset == plan(ids[:4], sensitivity_windows=2, curve_windows=4)
    assert subset.decoder_params_after == base.decoder_params_after


def test_curves_take_a_fixed_number_of_tokens_by_default(monkeypatch) -> None:
    from slimgpt_core import allocation
    from slimgpt_core.pruner import model_family, model_shape

    model = tiny_llama(layers=3)
    ids = windows(8, 32)
    base = make_plan(model_shape(model), 0.4, "log", "free")

    def plan(calibration, **windows_kw):
        return allocation.sensitivity_plan(model, calibration, base, "free", 0.01, 8, 64, 4,
                                           torch.device("cpu"), model_family(model),
                                           sensitivity_windows=2, **windows_kw)

    monkeypatch.setattr(allocation, "CURVE_TOKENS", 3 * 32 + 5)  # three whole windows
    assert plan(ids) == plan(ids, curve_windows=3) != plan(ids, curve_windows=8)


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
