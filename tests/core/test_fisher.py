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


def _tiny_vocab_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                      max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # confident, uneven predictions: far from the uniform case
        model.lm_head.weight.mul_(8.0)
    return model


def _exact_true_fisher(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``E_y[g g^T]`` at layer 0's ``o_proj`` output with every label drawn from the model:
    the labels of different positions are independent and each position's gradient has mean
    zero, so it is the sum over positions ``s`` and labels ``y`` of ``p_s(y) a a^T``, ``a``
    the gradient of that one loss term alone."""
    rows: list[torch.Tensor] = []
    o_proj = model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_full_backward_hook(
        lambda _m, _gi, gout: rows.append(gout[0].detach().reshape(-1, gout[0].shape[-1])))
    total = torch.zeros(o_proj.out_features, o_proj.out_features, dtype=torch.float64)
    try:
        with torch.enable_grad():
            embed = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embed, use_cache=False).logits[0].float()
            probs = torch.softmax(logits.detach(), dim=-1)
            for s in range(ids.shape[1] - 1):
                for y in range(logits.shape[-1]):
                    torch.nn.functional.cross_entropy(
                        logits[s:s + 1], torch.tensor([y])).backward(retain_graph=True)
                    g = rows.pop().double()
                    total += probs[s, y].double() * (g.T @ g)
    finally:
        handle.remove()
    return (total / ids.numel()).float()


def test_model_drawn_labels_estimate_the_true_fisher() -> None:
    model = _tiny_vocab_llama()
    ids = torch.randint(0, 12, (1, 8), generator=torch.Generator().manual_seed(0))
    family = model_family(model)
    exact = _exact_true_fisher(model, ids)
    sampled = output_fishers(model, ids, torch.device("cpu"), family, full=True,
                             label_samples=600, seed=0)[0][0]
    empirical = output_fishers(model, ids, torch.device("cpu"), family, full=True)[0][0]
    err = float(torch.linalg.norm(sampled - exact) / torch.linalg.norm(exact))
    assert err < 0.1, err
    # The text's own next tokens give another matrix (the empirical Fisher).
    assert float(torch.linalg.norm(empirical - exact) / torch.linalg.norm(exact)) > 3 * err


def test_model_drawn_labels_are_reproducible_by_seed() -> None:
    model, ids = tiny_llama(layers=1), windows(2, 16)
    family = model_family(model)

    def fisher(seed: int) -> torch.Tensor:
        return output_fishers(model, ids, torch.device("cpu"), family, full=False,
                              label_samples=2, seed=seed)[0][1]

    assert torch.equal(fisher(5), fisher(5))
    assert not torch.equal(fisher(5), fisher(6))


def test_prune_model_measures_the_fisher_on_model_drawn_labels_when_asked() -> None:
    base, ids = tiny_llama(layers=2), windows(4, 16)
    config = PruneConfig(target_ratio=0.3, selection="fisher", fisher_samples=2, seed=4,
                         min_group=8)
    with mock.patch.object(pruner_module, "output_fishers",
                           wraps=pruner_module.output_fishers) as spy:
        result = prune_model(copy.deepcopy(base), ids, config)
    assert spy.call_args.kwargs["label_samples"] == 2 and spy.call_args.kwargs["seed"] == 4
    assert result.settings["fisher_samples"] == 2
    assert "fisher_samples" not in PruneConfig(selection="fisher").fingerprint()


def test_fisher_samples_need_fisher_selection_and_are_not_negative() -> None:
    with pytest.raises(ValueError, match="needs selection='fisher'"):
        PruneConfig(fisher_samples=2)
    with pytest.raises(ValueError, match="fisher_samples must be >= 0"):
        PruneConfig(selection="fisher", fisher_samples=-1)
