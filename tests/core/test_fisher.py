"""Fisher selection: OBS's units scored in the loss's metric on the layer's output (K-FAC)."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

import slimgpt_core.pruner as pruner_module
from slimgpt_core.fisher import FISHER_DAMPING, OutputMetric, output_fishers
from slimgpt_core.heads import prune_heads
from slimgpt_core.pruner import PruneConfig, model_family, prune_model
from slimgpt_core.schedule import make_plan
from tests.core.tiny import tiny_llama, windows


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=g) * torch.linspace(0.2, 3.0, d)
    return x.T @ x / (4 * d)


def _obs_remove_head(W: torch.Tensor, H: torch.Tensor, head: int, head_dim: int,
                     percdamp: float) -> torch.Tensor:
    """Plain OBS removal of one head's columns (the textbook formula, no shared code)."""
    Hd = H + percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0])
    Hinv = torch.linalg.inv(Hd.double())
    cols = torch.arange(head * head_dim, (head + 1) * head_dim)
    Wd = W.double()
    out = Wd - Wd[:, cols] @ torch.linalg.inv(Hinv[cols][:, cols]) @ Hinv[cols, :]
    out[:, cols] = 0.0
    return out.float()


def test_the_metric_round_trip_is_exact() -> None:
    metric = OutputMetric.from_fisher(_spd(12, 0))
    W = torch.randn(12, 20)
    assert torch.allclose(metric.from_metric_space(metric.to_metric_space(W)), W, atol=1e-4)


def test_the_removed_head_is_the_one_cheapest_in_the_fisher_metric() -> None:
    heads, head_dim, out = 6, 4, 10
    W, H, F = torch.randn(out, heads * head_dim), _spd(heads * head_dim, 1), _spd(out, 2)
    Fd = F + FISHER_DAMPING * torch.diagonal(F).mean() * torch.eye(out)
    # Brute force: remove each head by plain OBS, measure tr(F dW H dW^T).
    costs = []
    for h in range(heads):
        delta = W - _obs_remove_head(W, H, h, head_dim, 0.01)
        costs.append(float(torch.trace(Fd @ delta @ H @ delta.T)))
    metric = OutputMetric.from_fisher(F)
    Ws = metric.to_metric_space(W)
    result = prune_heads(Ws, H, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
                         heads_to_remove=1, policy="group", percdamp=0.01)
    removed = (set(range(heads)) - set(result.kept_heads)).pop()
    assert removed == min(range(heads), key=costs.__getitem__)
    # ...and compensated exactly as plain OBS compensates that head.
    assert torch.allclose(metric.from_metric_space(Ws),
                          _obs_remove_head(W, H, removed, head_dim, 0.01), atol=1e-3)


def test_a_loss_blind_direction_decides_the_choice_that_plain_obs_gets_wrong() -> None:
    # Two heads write to two different output dimensions; the loss only reads the second.
    W = torch.zeros(2, 4)
    W[0, 0:2] = 5.0  # head 0: big, into the dimension the loss ignores
    W[1, 2:4] = 1.0  # head 1: small, into the dimension the loss reads
    H = torch.eye(4)
    F = torch.diag(torch.tensor([1e-6, 1.0]))
    plain = prune_heads(W.clone(), H, num_heads=2, num_kv_heads=2, head_dim=2,
                        heads_to_remove=1, policy="group", percdamp=0.01)
    metric = OutputMetric.from_fisher(F, damping=0.0)
    fisher = prune_heads(metric.to_metric_space(W), H, num_heads=2, num_kv_heads=2,
                         head_dim=2, heads_to_remove=1, policy="group", percdamp=0.01)
    assert plain.kept_heads == [0] and fisher.kept_heads == [1]


def test_the_full_fishers_diagonal_is_the_allocations_sensitivity() -> None:
    model, ids = tiny_llama(layers=2), windows(4, 16)
    family = model_family(model)
    full = output_fishers(model, ids, torch.device("cpu"), family, full=True)
    diag = output_fishers(model, ids, torch.device("cpu"), family, full=False)
    for (fa, ff), (da, df) in zip(full, diag):
        assert torch.allclose(torch.diagonal(fa), da, rtol=1e-4, atol=1e-10)
        assert torch.allclose(torch.diagonal(ff), df, rtol=1e-4, atol=1e-10)
        assert torch.allclose(fa, fa.T, atol=1e-8)
    assert all(p.requires_grad for p in model.parameters())  # left as found


def test_fisher_selection_prunes_to_the_plan_and_is_measured_on_the_asked_windows() -> None:
    base, ids = tiny_llama(layers=3), windows(8, 32)
    config = PruneConfig(target_ratio=0.4, selection="fisher", fisher_windows=3, batch_size=4,
                         min_group=8)
    with mock.patch.object(pruner_module, "output_fishers",
                           wraps=pruner_module.output_fishers) as spy:
        result = prune_model(copy.deepcopy(base), ids, config)
    assert spy.call_args.args[1].shape[0] == 3 and spy.call_args.kwargs["full"] is True
    plan = make_plan(pruner_module.model_shape(base), 0.4, "log", "free")
    assert result.params_after == plan.total_params_after
    assert result.settings["selection"] == "fisher"
    assert "fisher" in result.seconds


def test_fisher_selection_changes_which_units_go_not_how_many() -> None:
    base, ids = tiny_llama(layers=3), windows(8, 32)
    plain = prune_model(copy.deepcopy(base), ids, PruneConfig(target_ratio=0.4, min_group=8))
    fisher = prune_model(copy.deepcopy(base), ids, PruneConfig(
        target_ratio=0.4, min_group=8, selection="fisher"))
    assert [len(r.heads_kept) for r in plain.layers] == [len(r.heads_kept) for r in fisher.layers]
    assert ([r.heads_kept for r in plain.layers] != [r.heads_kept for r in fisher.layers]
            or [r.channels_kept for r in plain.layers] != [r.channels_kept for r in fisher.layers])


def test_fisher_selection_with_sensitivity_allocation_reuses_one_fisher_pass() -> None:
    base, ids = tiny_llama(layers=3), windows(8, 32)
    with mock.patch.object(pruner_module, "output_fishers",
                           wraps=pruner_module.output_fishers) as spy:
        result = prune_model(copy.deepcopy(base), ids, PruneConfig(
            target_ratio=0.3, selection="fisher", allocation="sensitivity", min_group=8))
    assert spy.call_count == 1
    assert result.plan.schedule == "sensitivity"
    assert result.params_after == make_plan(pruner_module.model_shape(base), 0.3, "log",
                                            "free").total_params_after


def test_unknown_selection_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown selection"):
        PruneConfig(selection="hessian")
    with pytest.raises(ValueError, match="fisher_windows"):
        PruneConfig(selection="fisher", fisher_windows=0)
