"""The served layout of each family the vLLM plugin serves is exact, and the plugin's family
table says what it serves and refuses; without vLLM (seconds).

For every family a tiny random model (tests/core/family_cases.py) is pruned the way a `hetero`
export is most irregular (log schedule, 3 of 8 query heads gone under the `free` GQA policy, so
every layer reads its KV heads by index), its widths are planned into the padded layout the
plugin builds (zero query heads, KV copies, zero FFN channels; tensor-parallel 1 and 2), and a
transformers model of the family with those served widths and the rewritten tensors
(slimgpt_core.served_weights, fused Phi-3 matrices included) must compute the pruned model's
logits. vLLM builds its layers from the same widths and loads the same rewritten tensors.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from slimgpt_core.export import export_config
from slimgpt_core.families import all_families
from slimgpt_core.modeling_slimgpt import hetero_classes
from slimgpt_core.pruner import PruneConfig, prune_model
from slimgpt_core.served_layout import LayoutError, base_model_type, plan_model
from slimgpt_core.served_weights import rewrite_weights
from slimgpt_vllm import REFUSED, SERVED, refusal
from slimgpt_vllm.layer_config import PLAIN_LAYOUT, check_servable, layout
from tests.core.family_cases import tiny_model, windows

#: Families whose layers vLLM has natively and the plugin builds from (OLMo-2: refused).
SERVED_FAMILIES = ["qwen3", "granite", "phi3", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def pruned():
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str) -> torch.nn.Module:
        if family not in cache:
            cache[family] = prune_model(tiny_model(family), windows(), PruneConfig(
                target_ratio=0.5, schedule="log", gqa_policy="free", head_ratio=0.375,
                batch_size=4, min_group=8)).model.eval()
        return cache[family]

    return get


def served_model(pruned_model: torch.nn.Module, tp: int):
    """A transformers model of the family with the served widths and the rewritten weights."""
    config = export_config(pruned_model, "hetero")
    layouts = plan_model(config, tp)
    served = config.to_dict()
    served.update(layer_num_heads=[x.num_heads for x in layouts],
                  layer_num_kv_heads=[x.num_kv_heads for x in layouts],
                  layer_intermediate_sizes=[x.intermediate_size for x in layouts],
                  layer_kv_index=None)
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        served.pop(key, None)
    config_cls, model_cls = hetero_classes(base_model_type(config))
    model = model_cls(config_cls(**served)).eval()
    state = dict(rewrite_weights(pruned_model.state_dict().items(), layouts, config.head_dim))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model, layouts


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", SERVED_FAMILIES)
def test_served_layout_of_each_family_computes_the_pruned_models_logits(pruned, family, tp):
    model, layouts = served_model(pruned(family), tp)
    assert all(not lay.is_identity for lay in layouts)  # every layer is padded: tested
    ids = windows(2, 24, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pruned(family)(ids).logits,
                                   rtol=0, atol=1e-5)


def test_fused_phi3_matrices_are_rewritten_section_by_section(pruned):
    config = export_config(pruned("phi3"), "hetero")
    lay = plan_model(config, 1)[0]
    d = config.head_dim
    state = pruned("phi3").state_dict()
    name = "model.layers.0.self_attn.qkv_proj.weight"
    out = dict(rewrite_weights([(name, state[name])], [lay], d))[name]
    h, k = lay.widths.num_heads, lay.widths.num_kv_heads
    assert out.shape[0] == (lay.num_heads + 2 * lay.num_kv_heads) * d
    first_v = lay.kv_source[0]  # served V head 0 is pruned V head kv_source[0]
    served_v = out[(lay.num_heads + lay.num_kv_heads) * d:][:d]
    torch.testing.assert_close(served_v, state[name][(h + k + first_v) * d:][:d])
    up = "model.layers.0.mlp.gate_up_proj.weight"
    out = dict(rewrite_weights([(up, state[up])], [lay], d))[up]
    f = lay.widths.intermediate_size
    assert out.shape[0] == 2 * lay.intermediate_size
    torch.testing.assert_close(out[lay.intermediate_size:][:f], state[up][f:])  # up section


def test_every_family_is_served_or_refused_with_a_reason():
    # a family added to slimgpt_core needs a plugin module or a stated refusal
    served = {base for base, _ in SERVED.values()}
    refused = {base for base, _ in REFUSED.values()}
    for family in all_families():
        assert (family.model_types[0] in served) != (family.model_types[0] in refused), family
        assert f"SlimGPT{family.stock_model}" in {*SERVED, *REFUSED}
    assert set(REFUSED) == {"SlimGPTOlmo2ForCausalLM", "SlimGPTMixtralForCausalLM",
                            "SlimGPTQwen3MoeForCausalLM"}
    reason = refusal(SimpleNamespace(architectures=["SlimGPTOlmo2ForCausalLM"]))
    assert "not served" in reason and "root-mean-square" in reason
    reason = refusal(SimpleNamespace(architectures=["SlimGPTQwen3MoeForCausalLM"]))
    assert "not served" in reason and "mixture-of-experts" in reason


def _config(model_type: str, **layout_kw: str) -> SimpleNamespace:
    return SimpleNamespace(model_type=f"slimgpt_{model_type}",
                           slimgpt_layout=dict(layout(**layout_kw)))


def test_plugin_serves_a_family_only_with_the_layout_its_layers_have():
    check_servable(_config("qwen3", head_norm="per_head"), "qwen3", ("qwen3",),
                   layout(head_norm="per_head"))
    with pytest.raises(LayoutError, match="head_norm"):
        check_servable(_config("qwen3", head_norm="per_head"), "llama", ("qwen3",), PLAIN_LAYOUT)
    with pytest.raises(LayoutError, match="not model_type 'slimgpt_olmo2'"):
        check_servable(_config("olmo2", head_norm="projection"), "qwen3", ("qwen3",),
                       layout(head_norm="per_head"))
    # a checkpoint written before slimgpt_layout existed is a plain Llama-layout one
    check_servable(SimpleNamespace(model_type="slimgpt_llama"), "llama", ("llama",),
                   PLAIN_LAYOUT)


def test_a_refused_family_unknown_to_transformers_does_not_stop_registration(monkeypatch):
    import transformers

    import slimgpt_core.modeling_slimgpt as modeling
    import slimgpt_vllm

    registered = []
    monkeypatch.setattr(transformers.AutoConfig, "register",
                        lambda model_type, cls, exist_ok=False: registered.append(model_type))
    monkeypatch.setitem(slimgpt_vllm.REFUSED, "SlimGPTFutureForCausalLM",
                        ("future_family", "not served"))
    real = modeling.hetero_classes

    def hetero_classes(base):
        if base == "future_family":
            raise KeyError(base)
        return real(base)

    monkeypatch.setattr(modeling, "hetero_classes", hetero_classes)
    slimgpt_vllm._register_configs()
    assert "slimgpt_qwen3" in registered and "slimgpt_olmo2" in registered
