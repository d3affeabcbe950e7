"""Every supported family, on a tiny random model of its stock config: the parameter target is
met and equals the torch-free estimate, compaction is exact, and both export profiles reload in
a fresh process (stock class for `uniform`, the shipped code for `hetero`) and generate the
in-memory pruned model's greedy tokens."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from slimgpt_core.export import describe_calibration, export_pruned
from slimgpt_core.families import family_for_config, supported_model_types
from slimgpt_core.pruner import PruneConfig, PruneResult, count_parameters, prune_model
from slimgpt_core.schedule import TARGET_TOLERANCE, estimate
from tests.core.family_cases import FAMILIES, MOE_FAMILIES, tiny_model, windows

PROMPT = [[5, 17, 33, 9, 64, 101], [7, 7, 90, 3, 45, 12]]
NEW_TOKENS = 8


def _prune(family: str, **kw: Any) -> PruneResult:
    kw.setdefault("batch_size", 4)
    kw.setdefault("min_group", 8)
    return prune_model(tiny_model(family), windows(), PruneConfig(**kw))


@pytest.fixture(scope="module")
def pruned():
    cache: dict[tuple, PruneResult] = {}

    def get(family: str, **kw: Any) -> PruneResult:
        key = (family, *sorted(kw.items()))
        if key not in cache:
            cache[key] = _prune(family, **kw)
        return cache[key]

    return get


def test_every_case_is_a_supported_family() -> None:
    assert {family_for_config(tiny_model(f).config).name for f in FAMILIES} == set(FAMILIES)
    assert len(supported_model_types()) >= len(FAMILIES)


#: The two prunings every family gets, shared by all tests below: 20% with the settings of a
#: `uniform` export, 50% with those of a `hetero` one: log schedule and 3 of 8 query heads gone
#: from each layer under policy `free`, which cannot leave two KV groups of 4 even, so every
#: layer reads its KV heads by index.
SETTINGS: dict[str, dict[str, Any]] = {
    "uniform": {"target_ratio": 0.2, "schedule": "uniform", "gqa_policy": "balanced",
                "plain_heads": True},
    "hetero": {"target_ratio": 0.5, "schedule": "log", "gqa_policy": "free",
               "head_ratio": 0.375},
}


@pytest.mark.parametrize("profile", ["uniform", "hetero"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_meets_the_target_and_the_torch_free_estimate(pruned, family, profile,
                                                              tmp_path) -> None:
    settings = SETTINGS[profile]
    target = settings["target_ratio"]
    result = pruned(family, **settings)
    assert abs(result.plan.achieved_ratio - target) <= TARGET_TOLERANCE
    # The estimate from config.json as saved (defaults left out) is the real model's size.
    tiny_model(family).config.save_pretrained(tmp_path)
    plan = estimate(json.loads((tmp_path / "config.json").read_text()), target,
                    settings["schedule"], settings["gqa_policy"],
                    head_ratio=settings.get("head_ratio"),
                    plain_heads=settings.get("plain_heads", False))
    assert plan["total_params_before"] == result.params_before
    assert plan["total_params_after"] == result.params_after == count_parameters(result.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_compacted_model_equals_masked_model(pruned, family) -> None:
    kw = dict(SETTINGS["hetero"])
    if family_for_config(tiny_model(family).config).layout.head_norm == "projection":
        # q/k norms over the whole projection take their RMS over the heads that remain, so a
        # model with fewer heads is not a masked dense one; the FFN side still must be exact.
        kw["head_ratio"] = 0.0
    if family in MOE_FAMILIES:
        # Fused experts of different widths (transformers' grouped_mm kernels) add up in
        # another order: the next layer's inputs differ by ~1e-7 and the random tiny experts'
        # near-tied channels can flip there. The first layer sees identical inputs, so there
        # compaction must be exact.
        kw["stop_after"] = 1
    compact = pruned(family, **kw)
    masked = pruned(family, compact=False, **kw)
    assert [r.heads_kept for r in compact.layers] == [r.heads_kept for r in masked.layers]
    assert [r.channels_kept for r in compact.layers] == [r.channels_kept for r in masked.layers]
    ids = windows(2, 24, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(compact.model(ids).logits, masked.model(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_olmo2_projection_norms_keep_the_rows_of_the_kept_heads(pruned) -> None:
    dense = tiny_model("olmo2")
    result = pruned("olmo2", **SETTINGS["hetero"])
    for before, after, report in zip(dense.model.layers, result.model.model.layers,
                                     result.layers):
        d = before.self_attn.head_dim
        q_rows = [h * d + j for h in report.heads_kept for j in range(d)]
        kv_rows = [h * d + j for h in report.kv_heads_kept for j in range(d)]
        assert torch.equal(after.self_attn.q_norm.weight, before.self_attn.q_norm.weight[q_rows])
        assert torch.equal(after.self_attn.k_norm.weight, before.self_attn.k_norm.weight[kv_rows])


def test_phi3_stays_fused_with_sections_of_the_kept_heads(pruned) -> None:
    dense = tiny_model("phi3")
    result = pruned("phi3", **SETTINGS["hetero"])
    layer, before, report = result.model.model.layers[0], dense.model.layers[0], result.layers[0]
    d, H, KV = 16, 8, 2
    rows = ([h * d + j for h in report.heads_kept for j in range(d)]
            + [H * d + h * d + j for h in report.kv_heads_kept for j in range(d)]
            + [(H + KV) * d + h * d + j for h in report.kv_heads_kept for j in range(d)])
    assert torch.equal(layer.self_attn.qkv_proj.weight, before.self_attn.qkv_proj.weight[rows])
    c = report.channels_kept
    gate_up = before.mlp.gate_up_proj.weight
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate_up[c], gate_up[256:][c]]))


# -- export: both profiles, checked in one fresh process ----------------------------------------
_GENERATE = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM

jobs = json.loads(sys.argv[1])
out = {}
for job in jobs:
    model, info = AutoModelForCausalLM.from_pretrained(
        job["folder"], trust_remote_code=job["trust_remote_code"], dtype=torch.float32,
        output_loading_info=True)
    model.eval()
    ids = torch.tensor(job["prompt"])
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, max_new_tokens=job["new_tokens"], min_new_tokens=job["new_tokens"],
                             do_sample=False, pad_token_id=0)
    out[job["key"]] = {
        "module": type(model).__module__, "class": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "problems": {k: [str(x) for x in v] for k, v in info.items() if v},
        "tokens": gen[:, ids.shape[1]:].tolist(), "logits": logits.tolist(),
    }
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def fresh_process_reloads(pruned, tmp_path_factory):
    """Export every family in both profiles, then reload and generate all of them in ONE
    fresh python process (no PYTHONPATH: the folders must stand on their own)."""
    jobs = []
    for family in FAMILIES:
        for profile in ("uniform", "hetero"):
            result = pruned(family, **SETTINGS[profile])
            folder = tmp_path_factory.mktemp(f"{family}-{profile}") / "model"
            export_pruned(result, folder, tokenizer=None, profile=profile,
                          base_model_id=f"tests/tiny-{family}",
                          calibration_info=describe_calibration(windows(), source="random"),
                          verify=False)
            jobs.append({"key": f"{family}/{profile}", "folder": str(folder), "prompt": PROMPT,
                         "trust_remote_code": profile == "hetero", "new_tokens": NEW_TOKENS})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", _GENERATE, json.dumps(jobs)], env=env,
                          cwd=tmp_path_factory.mktemp("fresh"), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("profile", ["uniform", "hetero"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_in_a_fresh_process_with_the_same_greedy_tokens(
        pruned, fresh_process_reloads, family, profile) -> None:
    result = pruned(family, **SETTINGS[profile])
    loaded = fresh_process_reloads[f"{family}/{profile}"]
    stock = family_for_config(result.model.config).stock_model
    if profile == "uniform":
        assert loaded["module"].startswith("transformers.models.")  # no remote code
        assert loaded["class"] == stock
    else:
        assert loaded["class"] == f"SlimGPT{stock}"
    assert not loaded["problems"], loaded["problems"]
    assert loaded["params"] == count_parameters(result.model)
    prompt = torch.tensor(PROMPT)
    model = copy.deepcopy(result.model)
    with torch.no_grad():
        logits = model(prompt).logits
        gen = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    torch.testing.assert_close(torch.tensor(loaded["logits"]), logits, rtol=0, atol=1e-4)
    assert gen[:, prompt.shape[1]:].tolist() == loaded["tokens"]


def test_hetero_cases_exercise_index_routed_kv_heads(pruned) -> None:
    # Guard for the test above: the hetero cases have layers whose query heads read their KV
    # heads irregularly.
    irregular = 0
    for family in FAMILIES:
        layers = pruned(family, **SETTINGS["hetero"]).layers
        irregular += any(r.kv_index != [j // (len(r.heads_kept) // len(r.kv_heads_kept))
                                        for j in range(len(r.heads_kept))]
                         or len(r.heads_kept) % len(r.kv_heads_kept) for r in layers)
    assert irregular == len(FAMILIES)


def test_hetero_config_names_the_family_layout(pruned, tmp_path: Path) -> None:
    result = pruned("phi3", **SETTINGS["hetero"])
    export_pruned(result, tmp_path / "m", tokenizer=None, profile="hetero",
                  base_model_id="tests/tiny-phi3",
                  calibration_info=describe_calibration(windows(), source="random"), verify=False)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "slimgpt_phi3"
    assert cfg["slimgpt_layout"] == {"family": "phi3", "base_model_type": "phi3",
                                     "base_architecture": "Phi3ForCausalLM", "qkv": "fused",
                                     "head_norm": "none", "ffn": "fused"}
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_slimgpt.SlimGPTPhi3ForCausalLM"
    assert len(cfg["layer_num_heads"]) == 3


# -- mixture of experts: per-expert Hessians and the few-token policy ---------------------------
def _spy_on_expert_hessians(monkeypatch) -> list[torch.Tensor]:
    """Record the Hessian each expert is pruned on, in call order (expert 0, 1, ...)."""
    import slimgpt_core.experts as experts_module

    seen: list[torch.Tensor] = []
    real = experts_module.prune_channels

    def spy(W: torch.Tensor, hessian: torch.Tensor, **kw: Any) -> Any:
        seen.append(hessian.clone())
        return real(W, hessian, **kw)

    monkeypatch.setattr(experts_module, "prune_channels", spy)
    return seen


def _layer0_expert_features(model: Any, calibration: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """From the pruned model, independently of the pruner: layer 0's FFN inputs (the stock
    forward, through its pruned attention), the stock router's choice per token, and each
    expert's kept ``act(gate) * up`` features on every token."""
    layer = model.model.layers[0]
    grabbed: list[torch.Tensor] = []
    hook = layer.mlp.register_forward_pre_hook(lambda _m, args: grabbed.append(args[0]))
    with torch.no_grad():
        model(calibration)
        hook.remove()
        x = grabbed[0].reshape(-1, grabbed[0].shape[-1])
        _logits, _weights, chosen = layer.mlp.gate(x)
        experts = layer.mlp.experts
        feats = []
        for e in range(experts.gate_up_proj.shape[0]):
            gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            feats.append(experts.act_fn(gate) * up)
    return x, chosen, feats


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_expert_hessian_is_that_of_the_tokens_routed_to_it(monkeypatch, family) -> None:
    seen = _spy_on_expert_hessians(monkeypatch)
    # expert_min_tokens=0: no blending (but for an expert no token reached)
    result = _prune(family, **SETTINGS["hetero"], stop_after=1, expert_min_tokens=0)
    report = result.layers[0]
    _x, chosen, feats = _layer0_expert_features(result.model, windows())
    assert len(seen) == len(feats) == 4
    for e, (H, f) in enumerate(zip(seen, feats)):
        routed = (chosen == e).any(dim=-1)
        n = int(routed.sum())
        assert 0 < n < chosen.shape[0] and report.expert_tokens[e] == n
        assert report.expert_pooled_share[e] == 0.0
        kept = report.expert_channels_kept[e]
        X = f[routed]
        torch.testing.assert_close(H[kept][:, kept], 2 * X.T @ X / n, rtol=1e-4, atol=1e-5)
    # Each expert has its own channels (not one shared choice) and its own Hessian.
    assert len({tuple(k) for k in report.expert_channels_kept}) > 1
    assert not torch.allclose(seen[0], seen[1])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_few_token_experts_blend_routed_and_pooled_hessians(monkeypatch, family) -> None:
    seen = _spy_on_expert_hessians(monkeypatch)
    # Default threshold = the expert's width, 512 channels: each expert here sees ~128 of the
    # 256 calibration tokens, so every one is blended, s = 1 - n / 512.
    result = _prune(family, **SETTINGS["hetero"], stop_after=1)
    report = result.layers[0]
    _x, chosen, feats = _layer0_expert_features(result.model, windows())
    total = chosen.shape[0]
    for e, (H, f) in enumerate(zip(seen, feats)):
        routed = (chosen == e).any(dim=-1)
        n = int(routed.sum())
        share = 1 - n / 512
        assert report.expert_pooled_share[e] == pytest.approx(share)
        kept = report.expert_channels_kept[e]
        X, P = f[routed], f  # the compacted model computes the kept channels only
        expected = (1 - share) * 2 * X.T @ X / n + share * 2 * P.T @ P / total
        torch.testing.assert_close(H[kept][:, kept], expected, rtol=1e-4, atol=1e-5)


def test_moe_expert_without_tokens_is_pruned_on_its_pooled_hessian() -> None:
    from slimgpt_core.experts import ExpertHessians, pooled_share
    from slimgpt_core.hessian import HessianAccumulator

    assert pooled_share(0, 0) == pooled_share(0, 64) == 1.0
    assert pooled_share(16, 64) == 0.75 and pooled_share(64, 64) == pooled_share(9, 0) == 0.0
    never, pooled = HessianAccumulator(3, "cpu"), HessianAccumulator(3, "cpu")
    x = torch.randn(10, 3)
    pooled.add(x)
    hess = ExpertHessians([never], {0: pooled}, min_tokens=0)
    torch.testing.assert_close(hess.hessian(0), 2 * x.T @ x / 10)


def test_moe_estimate_reads_either_expert_count_key_and_refuses_dense_qwen3_moe_layers(
        tmp_path) -> None:
    from slimgpt_core.schedule import PlanError

    tiny_model("qwen3_moe").config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # Qwen's own config.json files say num_experts; transformers writes num_local_experts.
    qwen_style = {k: v for k, v in config.items() if k != "num_local_experts"}
    qwen_style["num_experts"] = config["num_local_experts"]
    assert estimate(qwen_style, 0.2, "uniform")["total_params_before"] == \
        count_parameters(tiny_model("qwen3_moe"))
    for dense in ({"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}):
        with pytest.raises(PlanError, match="dense FFN layers.*not supported"):
            estimate({**config, **dense}, 0.2)


@pytest.mark.parametrize("setting", [{"target": "dense"}, {"allocation": "sensitivity"},
                                     {"selection": "fisher"}])
def test_moe_refuses_settings_it_does_not_implement(setting) -> None:
    with pytest.raises(ValueError, match="not implemented for mixture-of-experts"):
        prune_model(tiny_model("mixtral"), windows(), PruneConfig(**setting))


def test_moe_job_resumes_from_its_layer_checkpoints(pruned, tmp_path) -> None:
    # Service jobs checkpoint every finished layer: a MoE layer (fused, narrowed experts)
    # must come back from its checkpoint exactly.
    settings = SETTINGS["hetero"]
    _prune("qwen3_moe", **settings, checkpoint_dir=tmp_path, stop_after=1)
    resumed = _prune("qwen3_moe", **settings, checkpoint_dir=tmp_path)
    full = pruned("qwen3_moe", **settings)
    assert resumed.resumed_from == 1
    assert [r.expert_channels_kept for r in resumed.layers] == \
        [r.expert_channels_kept for r in full.layers]
    expected = full.model.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in resumed.model.state_dict().items())


def test_moe_export_records_each_experts_channels_and_says_how_they_were_pruned(
        pruned, tmp_path) -> None:
    result = pruned("qwen3_moe", **SETTINGS["hetero"])
    export_pruned(result, tmp_path / "m", tokenizer=None, profile="hetero",
                  base_model_id="tests/tiny-qwen3_moe",
                  calibration_info=describe_calibration(windows(), source="random"), verify=False)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["slimgpt_layout"]["ffn"] == "experts"
    assert cfg["layer_intermediate_sizes"] == [len(r.channels_kept) for r in result.layers]
    layers = json.loads((tmp_path / "m" / "pruning_config.json").read_text())["layers"]
    assert [entry["expert_channels_kept"] for entry in layers] == \
        [r.expert_channels_kept for r in result.layers]
    assert "Mixture of experts (4 per layer, router unchanged)" in \
        (tmp_path / "m" / "README.md").read_text()


def test_moe_expert_widths_stay_multiples_of_8() -> None:
    # transformers' grouped-matmul experts kernel refuses bf16 expert weights whose rows are
    # not 16 bytes apart (checked: width 412 fails, 416 runs), even where the dense width is
    # not a multiple of 8 itself.
    from slimgpt_core.schedule import ModelShape, make_plan

    shape = ModelShape(num_layers=4, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=16,
                       intermediate_size=300, vocab_size=128, num_experts=4)
    for ratio in (0.2, 0.37, 0.5):
        plan = make_plan(shape, ratio, "log", "free")
        assert all(lp.channels_kept % 8 == 0 for lp in plan.layers)


def test_moe_is_refused_by_the_stream_placement(tmp_path) -> None:
    from slimgpt_core.streaming import open_streamed

    tiny_model("mixtral").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported for mixture-of-experts"):
        open_streamed(tmp_path)


#: Released MoE shapes (from their config.json): Mixtral-8x7B and Qwen3-30B-A3B.
REAL_MOE_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-8x7b": ("MixtralConfig", {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", {
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True}),
}


@pytest.mark.parametrize("name", REAL_MOE_CONFIGS)
def test_moe_estimate_equals_the_real_sizes_of_released_shapes(name) -> None:
    # Built on the meta device: the stock dense model, and the shipped hetero modeling code
    # with the plan's per-layer widths, both counted parameter by parameter.
    import transformers

    from slimgpt_core.families import family_for_config
    from slimgpt_core.modeling_slimgpt import LAYOUT_KEY, hetero_classes

    config_name, fields = REAL_MOE_CONFIGS[name]
    config = getattr(transformers, config_name)(**fields)
    saved = {**config.to_diff_dict(), "model_type": config.model_type}
    plan = estimate(saved, 0.2, "log", "balanced")
    assert abs(plan["achieved_ratio"] - 0.2) <= TARGET_TOLERANCE
    family = family_for_config(saved)
    config_cls, model_cls = hetero_classes(config.model_type)
    pruned_config = config_cls(**saved, **{
        "layer_num_heads": [lp["heads_kept"] for lp in plan["layers"]],
        "layer_num_kv_heads": [lp["kv_heads_kept"] for lp in plan["layers"]],
        "layer_intermediate_sizes": [lp["channels_kept"] for lp in plan["layers"]],
        LAYOUT_KEY: family.layout.as_dict()})
    with torch.device("meta"):
        dense = transformers.AutoModelForCausalLM.from_config(config)
        pruned_model = model_cls(pruned_config)
    assert plan["total_params_before"] == count_parameters(dense)
    assert plan["total_params_after"] == count_parameters(pruned_model)
