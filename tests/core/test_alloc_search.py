"""Search allocation: the curves' allocation refined on the stitched model's divergence."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from slimgpt_core.alloc_search import (
    SearchSettings,
    _Fitness,
    _mutate,
    _Stitcher,
    level_grid,
    measure_levels,
    search,
)
from slimgpt_core.allocation import channel_steps, curve_max_ratio, head_units
from slimgpt_core.availability import unavailable
from slimgpt_core.layer_io import capture_layer_inputs
from slimgpt_core.pruner import PruneConfig, model_family, model_shape, prune_model
from slimgpt_core.schedule import ModelShape, PlanError, make_plan
from tests.core.tiny import peaked_llama, tiny_llama, windows

CPU = torch.device("cpu")
CONFIG = {"target_ratio": 0.4, "gqa_policy": "free", "batch_size": 4, "min_group": 8}


def _levels(model: torch.nn.Module, ids: torch.Tensor, grid: int = 16):
    plan = make_plan(model_shape(model), 0.4, "log", "free")
    acts, contexts = capture_layer_inputs(model, ids, CPU, 4, CPU)
    levels = measure_levels(model, acts, contexts, plan, "free", curve_max_ratio(plan), 0.01,
                            grid, 4, CPU, model_family(model))
    return plan, levels


def test_search_prunes_to_the_size_of_the_curves_plan() -> None:
    base = tiny_llama(layers=4)
    ids = windows(8, 32)
    sensitive = prune_model(copy.deepcopy(base), ids, PruneConfig(allocation="sensitivity",
                                                                   **CONFIG))
    searched = prune_model(copy.deepcopy(base), ids, PruneConfig(
        allocation="search", search_generations=20, **CONFIG))
    assert searched.params_after == sensitive.params_after
    assert searched.plan.schedule == "search"
    assert [len(r.heads_kept) for r in searched.layers] == [
        lp.heads_kept for lp in searched.plan.layers]
    assert [len(r.channels_kept) for r in searched.layers] == [
        lp.channels_kept for lp in searched.plan.layers]
    report = searched.to_dict()["allocation_search"]
    assert report["generations"] == 20 and report["final_kl"] <= report["start_kl"]
    assert report["grid"] == 64  # the finest grid the levels fit, recorded to re-run it


def test_without_generations_the_search_gives_the_sensitivity_model() -> None:
    """The search swaps weights in and out of the dense model: it must put them all back."""
    base = tiny_llama(layers=3)
    ids = windows(8, 32)
    sensitive = prune_model(copy.deepcopy(base), ids, PruneConfig(allocation="sensitivity",
                                                                   **CONFIG)).model
    searched = prune_model(copy.deepcopy(base), ids, PruneConfig(
        allocation="search", search_generations=0, **CONFIG)).model
    for (name, a), (_, b) in zip(sensitive.state_dict().items(),
                                 searched.state_dict().items()):
        assert torch.equal(a, b), name


def test_levels_remove_the_units_they_are_named_for() -> None:
    model = tiny_llama(layers=2)
    plan, levels = _levels(model, windows(8, 32))
    head_dim = model.config.head_dim
    for lv, lp in zip(levels, plan.layers):
        for u, w in enumerate(lv.heads):
            assert int((w.abs().sum(0) == 0).sum()) == u * head_dim
        assert lp.channels_removed in lv.channels
        for c, w in lv.channels.items():
            assert int((w.abs().sum(0) == 0).sum()) == c
            assert (c - lp.channels_removed) % 16 == 0


def test_the_stitched_dense_levels_are_the_dense_model_and_restore_is_exact() -> None:
    model = tiny_llama(layers=2)
    ids = windows(8, 32)
    _, levels = _levels(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stitcher = _Stitcher(model, model_family(model), levels, 8)
    fitness = _Fitness(model, ids, CPU, 2)
    stitcher.apply([0, 0], [0, 0])
    assert fitness(range(4)) == pytest.approx(0.0, abs=1e-6)
    stitcher.apply([3, 2], [16, 8])
    assert fitness(range(4)) > 1e-6
    stitcher.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fitness_is_the_mean_kl_divergence_from_the_dense_predictions() -> None:
    model = tiny_llama(layers=2)
    ids = windows(4, 16)
    fitness = _Fitness(model, ids, CPU, 2)
    with torch.no_grad():
        dense = F.log_softmax(model(ids).logits, -1)
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
        changed = F.log_softmax(model(ids).logits, -1)
    expected = F.kl_div(changed.flatten(0, 1), dense.flatten(0, 1), log_target=True,
                        reduction="batchmean")
    assert fitness(range(2)) == pytest.approx(float(expected), rel=1e-4)


def test_mutations_keep_the_totals_and_the_bounds() -> None:
    rng = random.Random(0)
    allowed = {i: list(range(s, 200, 8)) for i, s in enumerate([0, 3, 5, 1])}
    units, steps = [2, 0, 6, 3], [8, 19, 21, 9]
    for _ in range(500):
        units, steps = _mutate(units, steps, 6, allowed, 8, rng)
        assert sum(units) == 11 and sum(steps) == 57
        assert all(0 <= u <= 6 for u in units)
        assert all(s in allowed[i] for i, s in enumerate(steps))


def test_the_search_never_ends_worse_than_the_curves_allocation() -> None:
    model = tiny_llama(layers=3)
    ids = windows(8, 32)
    plan, levels = _levels(model, ids)
    result = search(model, model_family(model), levels, plan, "free", ids, CPU, 2,
                    SearchSettings(generations=15, grid=16))
    assert result.final_kl <= result.start_kl
    assert sum(result.units) == sum(head_units(plan, "free"))
    assert sum(result.steps) == sum(channel_steps(plan))
    fitness = _Fitness(model, ids, CPU, 2)
    stitcher = _Stitcher(model, model_family(model), levels, 8)
    stitcher.apply(result.units, result.steps)
    assert fitness(range(4)) == pytest.approx(result.final_kl, rel=1e-4)
    stitcher.restore()


SHAPE_8B = ModelShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                      head_dim=128, intermediate_size=14336, vocab_size=128256)


def test_the_channel_grid_coarsens_until_the_levels_fit() -> None:
    fine = level_grid(SHAPE_8B, "free", 0.45, 64, 2, 1 << 50)
    coarse = level_grid(SHAPE_8B, "free", 0.45, 64, 2, 80 * 2**30)
    assert fine == 64 and coarse > fine and coarse % 64 == 0


def test_levels_that_cannot_fit_are_refused_with_the_way_out() -> None:
    with pytest.raises(PlanError, match="allocation 'sensitivity'"):
        level_grid(SHAPE_8B, "free", 0.45, 64, 2, 4 * 2**30)


def test_search_needs_the_model_resident_on_one_gpu() -> None:
    assert unavailable({"allocation": "search"}, None, placement="stream") is not None
    assert unavailable({"allocation": "search"}, None, world_size=2) is not None
    assert unavailable({"allocation": "search"}, None, placement="resident") is None


def test_the_search_improves_a_lopsided_allocation() -> None:
    model = tiny_llama(layers=3)
    ids = windows(8, 32)
    plan = make_plan(model_shape(model), 0.4, [0.75, 0.05, 0.4], "free")
    acts, contexts = capture_layer_inputs(model, ids, CPU, 4, CPU)
    levels = measure_levels(model, acts, contexts, plan, "free", 0.95, 0.01, 16, 4, CPU,
                            model_family(model))
    result = search(model, model_family(model), levels, plan, "free", ids, CPU, 2,
                    SearchSettings(generations=30, grid=16))
    assert result.final_kl < 0.9 * result.start_kl
    assert result.steps[0] < channel_steps(plan)[0]


def test_a_single_layer_model_keeps_the_curves_allocation() -> None:
    base = tiny_llama(layers=1)
    ids = windows(8, 32)
    sensitive = prune_model(copy.deepcopy(base), ids, PruneConfig(allocation="sensitivity",
                                                                   **CONFIG))
    searched = prune_model(copy.deepcopy(base), ids, PruneConfig(allocation="search",
                                                                 **CONFIG))
    assert searched.plan.layers[0].heads_kept == sensitive.plan.layers[0].heads_kept
    assert searched.plan.layers[0].channels_kept == sensitive.plan.layers[0].channels_kept
    assert searched.allocation_search is None



def _kl_from(dense: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p = F.log_softmax(dense(ids).logits, -1)
        q = F.log_softmax(model(ids).logits, -1)
    return float((p.exp() * (p - q)).sum()) / ids.numel()


def test_the_trail_is_pruned_for_real_and_the_closest_pruned_model_is_kept() -> None:
    base = peaked_llama()
    ids = windows(8, 32)
    model = copy.deepcopy(base)
    result = prune_model(model, ids, PruneConfig(allocation="search", search_generations=40,
                                                 **CONFIG))
    report = result.allocation_search
    assert report is not None
    kls = report["pruned_kl"]
    assert 2 <= len(kls) <= 9
    assert kls[report["chosen"]] == min(kls)
    # each candidate is named by the generation it was the search's parent at
    gens = report["trail_generations"]
    assert len(gens) == len(kls) and gens[0] == 0 and gens == sorted(set(gens))
    assert gens[-1] <= 40
    # the model handed back is the chosen candidate's pruning, redone from the dense weights
    assert _kl_from(base, model, ids) == pytest.approx(min(kls), rel=1e-4)


def test_rescoring_leaves_the_model_dense_between_candidates() -> None:
    """Each candidate is pruned from the dense weights: the first one (the curves' plan)
    scores what allocation 'sensitivity' gives on its own."""
    base = peaked_llama()
    ids = windows(8, 32)
    sensitive = copy.deepcopy(base)
    prune_model(sensitive, ids, PruneConfig(allocation="sensitivity", **CONFIG))
    report = prune_model(copy.deepcopy(base), ids, PruneConfig(
        allocation="search", search_generations=40, **CONFIG)).allocation_search
    assert report is not None
    assert report["pruned_kl"][0] == pytest.approx(_kl_from(base, sensitive, ids), rel=1e-4)
