"""How a pruned layer's widths become a layout that vLLM's grouped-query layers can run exactly.

vLLM's attention kernels assume the standard grouped layout: ``num_heads = g * num_kv_heads``
and query head ``j`` reads KV head ``j // g``. A SlimGPT layer has its own widths and, under the
``free`` GQA policy, an explicit per-query-head KV index whose groups have unequal sizes (one KV
head serves three query heads, the next one). Tensor parallelism further asks that heads and FFN
channels split evenly across ranks.

This module plans, per layer and without touching tensors, a padded layout that satisfies both and
computes exactly what the pruned layer computes:

* every KV head ``k`` read by ``c_k`` query heads gets ``ceil(c_k / g)`` replicas (a copy of its
  K/V rows), each serving up to ``g`` of those query heads;
* empty query slots are *zero heads*: zero ``q_proj`` rows and zero ``o_proj`` columns, so they
  attend to something harmless and contribute exactly nothing;
* the FFN is padded with zero channels (zero gate/up rows, zero down columns: ``silu(0) * 0``).

The group size ``g`` is chosen to add the least: a zero query head costs two ``hidden x head_dim``
blocks of weights (its ``q_proj`` rows and ``o_proj`` columns), a KV copy the same two blocks plus
its share of the KV cache at every cached token, so it counts twice; on ties the larger ``g`` wins
(the smaller KV cache). A layer that is already regular (``balanced``/``group`` policies,
``uniform`` profile) keeps its layout unchanged at tensor-parallel size 1.

Pure Python, no torch and no vLLM: shared by the vLLM plugin, the GGUF export and the tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LayerLayout",
    "LayerWidths",
    "LayoutError",
    "base_model_type",
    "layer_widths_from_config",
    "plan_layer",
    "plan_model",
    "summarize",
]


class LayoutError(ValueError):
    """The config's per-layer widths are missing, inconsistent, or cannot be served."""


@dataclass(frozen=True)
class LayerWidths:
    """What a pruned layer has: query heads, KV heads, FFN channels and the KV index."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    kv_index: tuple[int, ...]  # per query head, the KV head it reads


@dataclass(frozen=True)
class LayerLayout:
    """What vLLM builds for a layer, and where each served head comes from.

    ``q_source[s]``: the pruned layer's query head that served query slot ``s`` computes, or None
    for a zero head. ``kv_source[r]``: the pruned layer's KV head that served KV head ``r`` copies.
    Served query slot ``s`` reads served KV head ``s // group_size``.
    """

    widths: LayerWidths
    q_source: tuple[int | None, ...]
    kv_source: tuple[int, ...]
    intermediate_size: int

    @property
    def num_heads(self) -> int:
        return len(self.q_source)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_source)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def padded_heads(self) -> int:
        """Zero query heads added."""
        return sum(q is None for q in self.q_source)

    @property
    def kv_replicas(self) -> int:
        """KV heads added (copies of a pruned KV head)."""
        return self.num_kv_heads - len(set(self.kv_source))

    @property
    def padded_channels(self) -> int:
        return self.intermediate_size - self.widths.intermediate_size

    @property
    def is_identity(self) -> bool:
        """True when the served layer is the pruned layer as it is (no padding, no copies)."""
        return (self.q_source == tuple(range(self.widths.num_heads))
                and self.kv_source == tuple(range(self.widths.num_kv_heads))
                and self.padded_channels == 0)


def base_model_type(config: Any) -> str:
    """``llama`` for a ``slimgpt_llama`` config (the architecture the layers come from)."""
    return str(getattr(config, "model_type", "")).removeprefix("slimgpt_")


def _per_layer(config: Any, key: str, n: int) -> list[Any] | None:
    value = getattr(config, key, None)
    if value is None:
        return None
    value = list(value)
    if len(value) != n:
        raise LayoutError(f"config.{key} has {len(value)} entries for {n} layers")
    return value


def layer_widths_from_config(config: Any) -> list[LayerWidths]:
    """Per-layer widths of a SlimGPT ``hetero`` config (or the uniform widths of a plain one)."""
    n = int(config.num_hidden_layers)
    heads = _per_layer(config, "layer_num_heads", n)
    kvs = _per_layer(config, "layer_num_kv_heads", n)
    ffns = _per_layer(config, "layer_intermediate_sizes", n)
    kv_index = _per_layer(config, "layer_kv_index", n)
    dense_heads = int(config.num_attention_heads)
    dense_kv = int(getattr(config, "num_key_value_heads", None) or dense_heads)
    heads = heads or [dense_heads] * n
    kvs = kvs or [dense_kv] * n
    ffns = ffns or [int(config.intermediate_size)] * n
    out = []
    for i in range(n):
        h, k, f = int(heads[i]), int(kvs[i]), int(ffns[i])
        if h < 1 or k < 1 or f < 1:
            raise LayoutError(
                f"layer {i} has {h} query heads, {k} KV heads and {f} FFN channels; a layer "
                "with no attention or no FFN left cannot be served (prune to a lower ratio)")
        if kv_index is not None and kv_index[i] is not None:
            index = tuple(int(x) for x in kv_index[i])
            if len(index) != h:
                raise LayoutError(f"layer {i}: layer_kv_index has {len(index)} entries for "
                                  f"{h} query heads")
            if any(not 0 <= x < k for x in index):
                raise LayoutError(f"layer {i}: layer_kv_index points outside its {k} KV heads")
        else:
            if h % k:
                raise LayoutError(f"layer {i}: {h} query heads do not split into {k} KV "
                                  "groups and the config has no layer_kv_index")
            index = tuple(j // (h // k) for j in range(h))
        out.append(LayerWidths(h, k, f, index))
    return out


def _tp_ok(num_kv: int, group: int, tp: int) -> bool:
    # vLLM splits query heads evenly across ranks and either splits KV heads evenly or
    # replicates them when there are fewer than ranks.
    return (num_kv % tp == 0 or tp % num_kv == 0) and (group * num_kv) % tp == 0


def plan_layer(widths: LayerWidths, tp_size: int = 1) -> LayerLayout:
    """The cheapest exact layout of ``widths`` for tensor-parallel size ``tp_size``."""
    if tp_size < 1:
        raise LayoutError(f"tensor-parallel size must be >= 1, got {tp_size}")
    readers: list[list[int]] = [[] for _ in range(widths.num_kv_heads)]
    for q, k in enumerate(widths.kv_index):
        readers[k].append(q)
    used = [k for k in range(widths.num_kv_heads) if readers[k]]
    max_readers = max(len(readers[k]) for k in used)
    best: tuple[tuple[int, int], int, int] | None = None
    for group in range(1, max_readers + tp_size + 1):
        num_kv = sum(math.ceil(len(readers[k]) / group) for k in used)
        while not _tp_ok(num_kv, group, tp_size):
            num_kv += 1
        added = (group * num_kv - widths.num_heads) + 2 * (num_kv - len(used))
        key = (added, -group)
        if best is None or key < best[0]:
            best = (key, group, num_kv)
    assert best is not None
    _, group, num_kv = best
    q_source: list[int | None] = []
    kv_source: list[int] = []
    for k in used:
        qs = readers[k]
        for start in range(0, len(qs), group):
            chunk: list[int | None] = list(qs[start:start + group])
            q_source.extend(chunk + [None] * (group - len(chunk)))
            kv_source.append(k)
    while len(kv_source) < num_kv:  # replicas that only make the head counts split across ranks
        kv_source.append(used[0])
        q_source.extend([None] * group)
    ffn = math.ceil(widths.intermediate_size / tp_size) * tp_size
    return LayerLayout(widths, tuple(q_source), tuple(kv_source), ffn)


def plan_model(config: Any, tp_size: int = 1) -> list[LayerLayout]:
    """One :class:`LayerLayout` per layer of ``config``."""
    return [plan_layer(w, tp_size) for w in layer_widths_from_config(config)]


def summarize(layouts: Sequence[LayerLayout]) -> Mapping[str, int]:
    """Totals of what the padding added, for logs and the model card."""
    return {
        "layers": len(layouts),
        "identity_layers": sum(lay.is_identity for lay in layouts),
        "zero_query_heads": sum(lay.padded_heads for lay in layouts),
        "kv_replicas": sum(lay.kv_replicas for lay in layouts),
        "zero_ffn_channels": sum(lay.padded_channels for lay in layouts),
    }
