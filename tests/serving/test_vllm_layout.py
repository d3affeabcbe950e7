"""The served layout (slimgpt_core.served_layout): what vLLM's grouped-query layers are given for each
pruned layer, checked on the widths alone (no torch, no vLLM)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from slimgpt_core.served_layout import (
    LayerWidths,
    LayoutError,
    layer_widths_from_config,
    plan_layer,
)


def widths(kv_index, num_kv=None, ffn=64):
    num_kv = num_kv if num_kv is not None else max(kv_index) + 1
    return LayerWidths(len(kv_index), num_kv, ffn, tuple(kv_index))


def reads(layout):
    """Per served query slot (that is not a zero head): (pruned query head, pruned KV head)."""
    g = layout.group_size
    return sorted((q, layout.kv_source[s // g]) for s, q in enumerate(layout.q_source)
                  if q is not None)


def test_regular_layer_is_served_as_it_is():
    lay = plan_layer(widths([0, 0, 0, 1, 1, 1]))
    assert lay.is_identity
    assert (lay.num_heads, lay.num_kv_heads, lay.group_size) == (6, 2, 3)


@pytest.mark.parametrize("kv_index", [
    [0, 0, 0, 1, 2],          # groups of 3, 1, 1 (SmolLM2 under the free policy)
    [0, 1, 1, 2, 2, 2],
    [0, 0, 0, 0, 1, 2, 3, 3],
    [1, 0, 1, 0, 2],          # not sorted
])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_query_head_reads_its_own_kv_head_exactly_once(kv_index, tp):
    w = widths(kv_index)
    lay = plan_layer(w, tp)
    assert reads(lay) == sorted(enumerate(kv_index))
    assert lay.num_heads == lay.group_size * lay.num_kv_heads


@pytest.mark.parametrize("kv_index", [[0, 0, 0, 1, 2], [0, 1, 1, 2, 2, 2], [0] * 3 + [1] * 2])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_served_widths_split_across_tensor_parallel_ranks(kv_index, tp):
    lay = plan_layer(widths(kv_index, ffn=100), tp)
    assert lay.num_heads % tp == 0
    assert lay.num_kv_heads % tp == 0 or tp % lay.num_kv_heads == 0
    assert lay.intermediate_size % tp == 0 and lay.intermediate_size >= 100


def test_unequal_groups_add_the_least_and_keep_the_kv_cache_on_ties():
    # groups 3,1,1: g=3 adds 4 zero query heads; g=1 copies 2 KV heads (each counts twice: its
    # weights and the KV cache it adds): a tie, and the larger group keeps the KV cache small
    lay = plan_layer(widths([0, 0, 0, 1, 2]))
    assert (lay.group_size, lay.num_kv_heads, lay.padded_heads, lay.kv_replicas) == (3, 3, 4, 0)
    # groups 4,1,1,1,1: g=4 would add 12 zero heads; g=2 adds 4 and one KV copy
    lay = plan_layer(widths([0, 0, 0, 0, 1, 2, 3, 4]))
    assert (lay.group_size, lay.num_kv_heads, lay.padded_heads, lay.kv_replicas) == (2, 6, 4, 1)


def test_ffn_is_padded_only_for_tensor_parallel_splits():
    assert plan_layer(widths([0, 1], ffn=1000), 1).intermediate_size == 1000
    assert plan_layer(widths([0, 1], ffn=1001), 2).intermediate_size == 1002


def _config(**kw):
    base = {"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                "intermediate_size": 256, "model_type": "slimgpt_llama"}
    return SimpleNamespace(**{**base, **kw})


def test_config_without_kv_index_gets_the_grouped_layout():
    cfg = _config(layer_num_heads=[4, 6], layer_num_kv_heads=[2, 2],
                  layer_intermediate_sizes=[128, 64])
    w = layer_widths_from_config(cfg)
    assert w[0].kv_index == (0, 0, 1, 1) and w[1].kv_index == (0, 0, 0, 1, 1, 1)
    assert [x.intermediate_size for x in w] == [128, 64]


def test_plain_config_reads_as_uniform_widths():
    w = layer_widths_from_config(_config())
    assert {(x.num_heads, x.num_kv_heads, x.intermediate_size) for x in w} == {(8, 2, 256)}


@pytest.mark.parametrize("bad, message", [
    ({"layer_num_heads": [4]}, "1 entries for 2 layers"),
    ({"layer_num_heads": [0, 4]}, "no attention or no FFN"),
    ({"layer_num_heads": [3, 4], "layer_num_kv_heads": [2, 2]}, "do not split"),
    ({"layer_num_heads": [2, 2], "layer_num_kv_heads": [1, 1], "layer_kv_index": [[0, 1], [0, 0]]},
     "outside"),
    ({"layer_num_heads": [2, 2], "layer_num_kv_heads": [1, 1], "layer_kv_index": [[0], [0, 0]]},
     "1 entries for 2 query heads"),
])
def test_inconsistent_configs_are_refused_with_the_reason(bad, message):
    with pytest.raises(LayoutError, match=message):
        layer_widths_from_config(_config(**bad))
