"""The weight rewrite (slimgpt_core.served_weights) is exact: a transformers model built with the served
widths and the rewritten tensors computes the pruned model's logits. Runs without vLLM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from _export_helpers import make_pruned, window

from slimgpt_core.export import export_config
from slimgpt_core.modeling_slimgpt import hetero_classes
from slimgpt_core.served_layout import plan_model
from slimgpt_core.served_weights import rewrite_weights


@pytest.fixture(scope="module")
def pruned_free():
    result, _ = make_pruned("gqa_free")  # target 0.4: layers with groups of 4+3, 3+2, 1+2
    return result.model.eval()


def served_model(pruned, tp):
    config = export_config(pruned, "hetero")
    layouts = plan_model(config, tp)
    served = config.to_dict()
    served.update(layer_num_heads=[x.num_heads for x in layouts],
                  layer_num_kv_heads=[x.num_kv_heads for x in layouts],
                  layer_intermediate_sizes=[x.intermediate_size for x in layouts],
                  layer_kv_index=None)
    config_cls, model_cls = hetero_classes("llama")
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        served.pop(key, None)
    model = model_cls(config_cls(**served)).eval()
    state = dict(rewrite_weights(pruned.state_dict().items(), layouts, config.head_dim))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model, layouts


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_served_layout_computes_the_pruned_models_logits(pruned_free, tp):
    model, layouts = served_model(pruned_free, tp)
    # the free policy left unequal groups somewhere, or this test would not test padding
    assert any(not lay.is_identity for lay in layouts)
    ids = window()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pruned_free(ids).logits, rtol=0, atol=1e-5)


def test_regular_layers_pass_through_untouched(pruned_free):
    layouts = plan_model(export_config(pruned_free, "hetero"), 1)
    state = pruned_free.state_dict()
    out = dict(rewrite_weights(state.items(), layouts, 16))
    for i, lay in enumerate(layouts):
        if lay.is_identity:
            name = f"model.layers.{i}.self_attn.q_proj.weight"
            assert out[name] is state[name]
    assert out["model.embed_tokens.weight"] is state["model.embed_tokens.weight"]
