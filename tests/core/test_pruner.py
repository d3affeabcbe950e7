"""The layer-wise SlimGPT driver on tiny models: shapes, GQA validity, equivalences, resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from slimgpt_core.pruner import ProgressEvent, PruneConfig, PruningCancelled, prune_model
from tests.core.tiny import peaked_llama, tiny_llama, tiny_qwen2, windows


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _prune(model, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("min_group", 8)
    return prune_model(model, windows(), PruneConfig(**kw))


def test_pruned_layers_are_physically_smaller() -> None:
    result = _prune(tiny_llama(), target_ratio=0.4)
    for layer, report in zip(result.model.model.layers, result.layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.out_features == 16 * len(report.heads_kept)
        assert attn.o_proj.in_features == 16 * len(report.heads_kept)
        assert attn.k_proj.out_features == 16 * len(report.kv_heads_kept)
        assert mlp.down_proj.in_features == len(report.channels_kept)
    assert result.params_after < result.params_before


def test_achieved_parameter_count_matches_plan() -> None:
    result = _prune(tiny_llama(), target_ratio=0.4)
    dense_layers = sum(lp.params_before for lp in result.plan.layers)
    pruned_layers = sum(lp.params_after for lp in result.plan.layers)
    assert result.params_before - result.params_after == dense_layers - pruned_layers


def test_balanced_policy_keeps_every_kv_head_and_equal_groups() -> None:
    result = _prune(tiny_llama(num_heads=8, num_kv_heads=2), target_ratio=0.5,
                    gqa_policy="balanced", schedule="uniform")
    for layer, report in zip(result.model.model.layers, result.layers):
        assert report.kv_heads_kept == [0, 1]
        per_group = [sum(1 for h in report.heads_kept if h // 4 == g) for g in (0, 1)]
        assert per_group[0] == per_group[1]
        assert layer.self_attn.num_key_value_groups == per_group[0]


def test_group_policy_drops_whole_kv_groups() -> None:
    result = _prune(tiny_llama(num_heads=8, num_kv_heads=4), target_ratio=0.5,
                    gqa_policy="group", schedule="uniform")
    for report in result.layers:
        groups = {h // 2 for h in report.heads_kept}
        assert sorted(groups) == report.kv_heads_kept
        assert all(sum(1 for h in report.heads_kept if h // 2 == g) == 2 for g in groups)
        assert len(report.kv_heads_kept) < 4


def test_free_policy_model_runs_with_uneven_groups() -> None:
    model = tiny_llama(num_heads=8, num_kv_heads=2, layers=2)
    result = _prune(model, target_ratio=0.5, gqa_policy="free", schedule="uniform")
    logits = _logits(result.model, windows(2, 16, seed=5))
    assert torch.isfinite(logits).all()
    for report in result.layers:
        assert report.kv_index == [report.kv_heads_kept.index(h // 4) for h in report.heads_kept]


@pytest.mark.parametrize("policy", ["balanced", "group", "free"])
def test_compacted_model_equals_masked_model(policy: str) -> None:
    base = tiny_llama(num_heads=8, num_kv_heads=2)
    ids = windows(2, 24, seed=7)
    compact = _prune(copy.deepcopy(base), target_ratio=0.4, gqa_policy=policy)
    masked = _prune(copy.deepcopy(base), target_ratio=0.4, gqa_policy=policy, compact=False)
    assert [r.heads_kept for r in compact.layers] == [r.heads_kept for r in masked.layers]
    assert [r.channels_kept for r in compact.layers] == [r.channels_kept for r in masked.layers]
    torch.testing.assert_close(_logits(compact.model, ids), _logits(masked.model, ids),
                               rtol=1e-4, atol=1e-4)


def test_multi_head_attention_prunes_query_and_kv_heads_together() -> None:
    result = _prune(tiny_llama(num_heads=8, num_kv_heads=8), target_ratio=0.4)
    for report in result.layers:
        assert report.kv_heads_kept == report.heads_kept


def test_attention_bias_rows_follow_kept_heads() -> None:
    base = tiny_qwen2()
    biases = [layer.self_attn.q_proj.bias.detach().clone() for layer in base.model.layers]
    result = _prune(base, target_ratio=0.4, gqa_policy="balanced", schedule="uniform")
    for layer, report, bias in zip(result.model.model.layers, result.layers, biases):
        hd = layer.self_attn.head_dim
        expected = torch.cat([bias[h * hd:(h + 1) * hd] for h in report.heads_kept])
        torch.testing.assert_close(layer.self_attn.q_proj.bias, expected)
    assert torch.isfinite(_logits(result.model, windows(2, 16))).all()


def test_compensation_lowers_every_layers_error() -> None:
    result = _prune(tiny_llama(), target_ratio=0.4)
    for r in result.layers:
        assert r.ffn_error < r.ffn_error_uncompensated
        assert r.attn_error <= r.attn_error_uncompensated


def test_same_inputs_give_same_kept_indices() -> None:
    a = _prune(tiny_llama(), target_ratio=0.3)
    b = _prune(tiny_llama(), target_ratio=0.3)
    assert [(r.heads_kept, r.channels_kept) for r in a.layers] == \
        [(r.heads_kept, r.channels_kept) for r in b.layers]


def test_progress_reports_every_layer_in_order() -> None:
    events: list[ProgressEvent] = []
    prune_model(tiny_llama(), windows(), PruneConfig(target_ratio=0.3, batch_size=4, min_group=8),
                progress=events.append)
    done = [e.layer for e in events if e.phase == "layer_done"]
    assert done == [0, 1, 2]
    assert events[0].phase == "calibrating"
    assert all(e.num_layers == 3 for e in events)
    assert {"attn_error", "ffn_error"} <= set(events[-1].metrics)


def test_progress_reports_the_whole_model_passes_before_the_first_layer() -> None:
    """The Fisher, the curves and the search run before any layer (minutes at 8B): each is
    announced, and the candidates the search prunes for real report nothing."""
    events: list[ProgressEvent] = []
    prune_model(peaked_llama(), windows(), PruneConfig(
        target_ratio=0.4, batch_size=4, min_group=8, gqa_policy="free", selection="fisher",
        allocation="search", search_generations=40), progress=events.append)
    phases = [e.phase for e in events]
    first = phases.index("calibrating")
    assert phases[0] == "fisher" and set(phases[1:first]) == {"allocation"}
    assert phases.count("calibrating") == 1
    # the search reports a quarter of its generations, then every candidate it judges
    generations = [e.metrics["generation"] for e in events if "generation" in e.metrics]
    assert generations == [10, 20, 30, 40]
    judged = [e.metrics["judged"] for e in events if "judged" in e.metrics]
    assert judged == list(range(1, judged[-1] + 1)) and judged[-1] >= 2
    chosen = events[first - 1]
    assert "(search)" in chosen.message
    assert chosen.metrics["allocation_s"] > 0
    assert chosen.metrics["search_final_kl"] <= chosen.metrics["search_start_kl"]


def test_a_cancel_during_the_allocation_stops_before_any_layer_is_touched() -> None:
    events: list[ProgressEvent] = []
    with pytest.raises(PruningCancelled) as info:
        prune_model(tiny_llama(), windows(), PruneConfig(
            target_ratio=0.3, batch_size=4, min_group=8, gqa_policy="free",
            allocation="sensitivity"), progress=events.append, should_cancel=lambda: True)
    assert info.value.layers_done == 0
    assert [e.phase for e in events] == []


@pytest.mark.parametrize("stage", ["generation", "judged"])
def test_a_cancel_during_the_search_stops_it_and_leaves_the_model_dense(stage: str) -> None:
    model = peaked_llama()
    dense = copy.deepcopy(model.state_dict())
    events: list[ProgressEvent] = []
    with pytest.raises(PruningCancelled) as info:
        prune_model(model, windows(), PruneConfig(
            target_ratio=0.4, batch_size=4, min_group=8, gqa_policy="free",
            allocation="search", search_generations=40), progress=events.append,
            should_cancel=lambda: any(stage in e.metrics for e in events))
    assert info.value.layers_done == 0
    assert "calibrating" not in {e.phase for e in events}
    assert [e for e in events if stage in e.metrics][-1] is events[-1]  # stopped at once
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, dense[name]), name


def test_resume_after_layer_k_equals_uninterrupted_run(tmp_path: Path) -> None:
    base = tiny_llama(layers=4)
    full = _prune(copy.deepcopy(base), target_ratio=0.4)

    calls = iter([False, False, True])  # cancel before layer 2
    with pytest.raises(PruningCancelled) as info:
        prune_model(copy.deepcopy(base), windows(),
                    PruneConfig(target_ratio=0.4, batch_size=4, min_group=8,
                                checkpoint_dir=tmp_path),
                    should_cancel=lambda: next(calls))
    assert info.value.layers_done == 2

    resumed = prune_model(copy.deepcopy(base), windows(),
                          PruneConfig(target_ratio=0.4, batch_size=4, min_group=8,
                                      checkpoint_dir=tmp_path))
    assert resumed.resumed_from == 2
    assert [r.channels_kept for r in resumed.layers] == [r.channels_kept for r in full.layers]
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name


def test_cancelled_run_leaves_only_finished_layers_checkpointed(tmp_path: Path) -> None:
    calls = iter([False, True])
    with pytest.raises(PruningCancelled):
        prune_model(tiny_llama(), windows(), PruneConfig(target_ratio=0.4, batch_size=4,
                    min_group=8, checkpoint_dir=tmp_path), should_cancel=lambda: next(calls))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "layer_0000.json", "layer_0000.safetensors", "manifest.json"]


def test_checkpoints_of_another_run_are_refused(tmp_path: Path) -> None:
    _prune(tiny_llama(), target_ratio=0.4, checkpoint_dir=tmp_path)
    from slimgpt_core.checkpoint import CheckpointMismatch

    with pytest.raises(CheckpointMismatch):
        _prune(tiny_llama(), target_ratio=0.3, checkpoint_dir=tmp_path)


def test_batch_size_does_not_change_kept_indices() -> None:
    a = _prune(tiny_llama(), target_ratio=0.4, batch_size=1)
    b = _prune(tiny_llama(), target_ratio=0.4, batch_size=8)
    assert [r.heads_kept for r in a.layers] == [r.heads_kept for r in b.layers]
    assert [r.channels_kept for r in a.layers] == [r.channels_kept for r in b.layers]


def test_offloaded_activations_give_the_same_model() -> None:
    a = _prune(tiny_llama(), target_ratio=0.4)
    b = _prune(tiny_llama(), target_ratio=0.4, offload_activations=True)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_bad_calibration_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="calibration"):
        prune_model(tiny_llama(), torch.zeros(0, 8, dtype=torch.long), PruneConfig())


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="method"):
        PruneConfig(method="random")


def _distinct_importances(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Scale each FFN channel and each head of the output projections by a factor between 1/8
    and 8. Random init makes every unit about equally important, so bf16 rounding flips
    near-ties and later layers inherit the flips (measured: 17% of the channels of layer 1
    on the plain tiny model, as much on CPU in bf16 as on CUDA); trained models have distinct
    importances, and that is what the comparison below is about."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            down = layer.mlp.down_proj.weight
            down.mul_(8.0 ** (2 * torch.rand(down.shape[1], generator=g) - 1))
            o = layer.self_attn.o_proj.weight
            head_dim = o.shape[1] // layer.self_attn.config.num_attention_heads
            scale = 8.0 ** (2 * torch.rand(o.shape[1] // head_dim, generator=g) - 1)
            o.mul_(scale.repeat_interleave(head_dim))
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_bf16_pruning_keeps_the_same_heads_and_channels_as_cpu() -> None:
    # Same bf16-rounded weights on both sides: only the activations' precision differs.
    weights = _distinct_importances(tiny_llama()).to(torch.bfloat16)
    cpu = _prune(copy.deepcopy(weights).float(), target_ratio=0.4, device="cpu")
    gpu = _prune(copy.deepcopy(weights), target_ratio=0.4, device="cuda")
    assert [r.heads_kept for r in gpu.layers] == [r.heads_kept for r in cpu.layers]
    for g, c in zip(gpu.layers, cpu.layers):
        same = len(set(g.channels_kept) & set(c.channels_kept))
        # bf16 activations may flip a few near-ties among the channels, never the bulk.
        assert same >= 0.95 * len(c.channels_kept), (g.index, same, len(c.channels_kept))
    logits = _logits(gpu.model.to("cuda"), windows(2, 16).to("cuda"))
    assert torch.isfinite(logits.float()).all()


# -- what each layer's Hessians are built from ------------------------------------------------
def _record_hessian_inputs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[torch.Tensor]]:
    from slimgpt_core.hessian import HessianAccumulator

    seen: dict[str, list[torch.Tensor]] = {}
    original = HessianAccumulator.add

    def spy(self: HessianAccumulator, x: torch.Tensor) -> None:
        seen.setdefault(self.name, []).append(x.detach().reshape(-1, x.shape[-1]).clone())
        original(self, x)

    monkeypatch.setattr(HessianAccumulator, "add", spy)
    return seen


def _module_inputs(model: torch.nn.Module, module: torch.nn.Module,
                   ids: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    try:
        _logits(model, ids)
    finally:
        handle.remove()
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in got])


def test_each_layer_is_calibrated_on_the_outputs_of_the_already_pruned_layers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_llama(layers=3)
    seen = _record_hessian_inputs(monkeypatch)
    ids = windows()
    result = prune_model(copy.deepcopy(base), ids, PruneConfig(target_ratio=0.4, batch_size=8,
                                                               min_group=8))
    for i in range(3):
        # o_proj of layer i, still dense, behind layers 0..i-1 as they were finally pruned.
        hybrid = copy.deepcopy(result.model)
        hybrid.model.layers[i] = copy.deepcopy(base.model.layers[i])
        expected = _module_inputs(hybrid, hybrid.model.layers[i].self_attn.o_proj, ids)
        got = torch.cat(seen[f"layer {i} self_attn.o_proj"])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        if i > 0:  # and not behind the dense layers
            dense_inputs = _module_inputs(base, base.model.layers[i].self_attn.o_proj, ids)
            assert (got - dense_inputs).abs().max() > 1e-3 * got.abs().max()


def test_ffn_hessian_is_collected_behind_the_pruned_attention(
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_llama(layers=2)
    seen = _record_hessian_inputs(monkeypatch)
    ids = windows()
    result = prune_model(copy.deepcopy(base), ids, PruneConfig(target_ratio=0.4, batch_size=8,
                                                               min_group=8))
    for i, report in enumerate(result.layers):
        got = torch.cat(seen[f"layer {i} mlp.down_proj"])
        pruned_layer = result.model.model.layers[i]
        kept_now = _module_inputs(result.model, pruned_layer.mlp.down_proj, ids)
        torch.testing.assert_close(got[:, report.channels_kept], kept_now, rtol=1e-4, atol=1e-5)
        # The attention of this layer was already pruned: with it dense the input differs.
        hybrid = copy.deepcopy(result.model)
        hybrid.model.layers[i].self_attn = copy.deepcopy(base.model.layers[i].self_attn)
        hybrid.model.layers[i].mlp = copy.deepcopy(base.model.layers[i].mlp)
        dense_attn = _module_inputs(hybrid, hybrid.model.layers[i].mlp.down_proj, ids)
        assert (got - dense_attn).abs().max() > 1e-3 * got.abs().max()


# -- guarding the maths -----------------------------------------------------------------------
def test_non_finite_activations_fail_at_once_naming_the_layer() -> None:
    from slimgpt_core.errors import NonFiniteHessianError

    model = tiny_llama(layers=3)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteHessianError, match="layer 1 self_attn.o_proj") as info:
        _prune(model, target_ratio=0.4)
    assert not isinstance(info.value, torch.linalg.LinAlgError)


def test_raised_damping_is_reported_for_the_layer_that_needed_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from slimgpt_core.hessian import HessianAccumulator

    original = HessianAccumulator.hessian

    def indefinite_in_layer_1(self: HessianAccumulator) -> torch.Tensor:
        H = original(self)
        if self.name == "layer 1 mlp.down_proj":  # a matrix no real data gives: forces retries
            H = H.clone()
            big = 10 * torch.diagonal(H).max()
            H[0, 1] = H[1, 0] = big
        return H

    monkeypatch.setattr(HessianAccumulator, "hessian", indefinite_in_layer_1)
    events: list[ProgressEvent] = []
    result = prune_model(tiny_llama(layers=3), windows(),
                         PruneConfig(target_ratio=0.4, batch_size=4, min_group=8),
                         progress=events.append)
    raised = result.damping_raised()
    assert [(d["layer"], d["module"]) for d in raised] == [(1, "mlp.down_proj")]
    assert raised[0]["retries"] >= 1 and raised[0]["percdamp_used"] > 1.0
    assert result.to_dict()["damping_raised"] == raised
    done = {e.layer: e for e in events if e.phase == "layer_done"}
    assert done[1].metrics["damping_retries"] == raised[0]["retries"]
    assert "damping raised on mlp.down_proj" in done[1].message
    assert done[0].metrics["damping_retries"] == 0 and "damping" not in done[0].message


@pytest.mark.parametrize(("ratio", "schedule"), [(0.3, "log"), (0.7, "uniform")])
def test_free_policy_model_has_exactly_the_planned_size(ratio: float, schedule: str) -> None:
    # At 0.7 whole KV groups must go; the plan (and the API's estimate) knows how many.
    from slimgpt_core.schedule import estimate

    model = tiny_llama(num_heads=8, num_kv_heads=4)
    planned = estimate(model.config.to_dict(), ratio, schedule, "free")
    result = _prune(model, target_ratio=ratio, gqa_policy="free", schedule=schedule)
    assert result.params_after == planned["total_params_after"] + (
        result.params_before - planned["total_params_before"])
    assert [len(r.kv_heads_kept) for r in result.layers] == [
        lp["kv_heads_kept"] for lp in planned["layers"]]
    if ratio == 0.7:
        assert any(lp["kv_heads_kept"] < 4 for lp in planned["layers"])



@pytest.mark.parametrize("plain_heads", [False, True], ids=["hetero", "plain"])
def test_estimate_without_a_policy_has_the_size_of_a_run_without_one(plain_heads: bool) -> None:
    # One default GQA policy for the dry run and the pruner (it once was `balanced` for the
    # estimate and `free` for PruneConfig); the two policies give different sizes here.
    from slimgpt_core.schedule import estimate

    model = tiny_llama(num_heads=8, num_kv_heads=4)
    config, ratio = model.config.to_dict(), 0.2
    sizes = {p: estimate(config, ratio, "log", p, plain_heads=plain_heads)["total_params_after"]
             for p in ("free", "balanced")}
    assert sizes["free"] != sizes["balanced"]
    planned = estimate(config, ratio, "log", plain_heads=plain_heads)
    result = _prune(model, target_ratio=ratio, plain_heads=plain_heads)
    assert result.params_after == planned["total_params_after"] + (
        result.params_before - planned["total_params_before"])
    assert planned["gqa_policy"] == result.plan.gqa_policy == (
        "balanced" if plain_heads else "free")

# -- compensating towards the dense model -----------------------------------------------------
def _hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def test_dense_target_tracks_the_dense_model_more_closely_than_the_layer_target() -> None:
    base = tiny_llama(layers=4)
    ids = windows(16, 32)
    ref = _hidden(base, ids)
    errors = {}
    for target in ("layer", "dense"):
        result = prune_model(copy.deepcopy(base), ids, PruneConfig(
            target_ratio=0.4, batch_size=8, min_group=8, target=target))
        errors[target] = float((_hidden(result.model, ids) - ref).pow(2).mean())
    assert errors["dense"] < errors["layer"]


def test_dense_target_keeps_the_same_size_and_first_layer_heads() -> None:
    base = tiny_llama()
    layer = _prune(copy.deepcopy(base), target_ratio=0.4)
    dense = _prune(copy.deepcopy(base), target_ratio=0.4, target="dense")
    assert dense.params_after == layer.params_after
    # Layer 0's attention sees the same input either way (its FFN does not: with the dense
    # target it also makes up for what this layer's own head removal lost).
    assert dense.layers[0].heads_kept == layer.layers[0].heads_kept
    o_layer = layer.model.model.layers[0].self_attn.o_proj.weight
    o_dense = dense.model.model.layers[0].self_attn.o_proj.weight
    torch.testing.assert_close(o_dense, o_layer, rtol=1e-3, atol=1e-4)


def test_dense_target_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    base = tiny_llama(layers=4)
    full = _prune(copy.deepcopy(base), target_ratio=0.4, target="dense")
    calls = iter([False, False, True])
    cfg = {"target_ratio": 0.4, "batch_size": 4, "min_group": 8, "checkpoint_dir": tmp_path,
           "target": "dense"}
    with pytest.raises(PruningCancelled):
        prune_model(copy.deepcopy(base), windows(), PruneConfig(**cfg),
                    should_cancel=lambda: next(calls))
    resumed = prune_model(copy.deepcopy(base), windows(), PruneConfig(**cfg))
    assert resumed.resumed_from == 2
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
