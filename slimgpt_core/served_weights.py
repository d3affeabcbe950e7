"""Rewrite a pruned checkpoint's tensors into the served layout of :mod:`slimgpt_core.served_layout`.

Each tensor is rewritten on its own (no layer has to be complete first), so this works on the
stream of (name, tensor) pairs that vLLM's loaders produce shard by shard. Names are those of the
Hugging Face checkpoint (``model.layers.<i>.self_attn.q_proj.weight`` ...); anything else passes
through untouched. Fused projections (Phi-3's ``qkv_proj`` rows ``[q | k | v]`` and
``gate_up_proj`` rows ``[gate | up]``) are split at the pruned layer's widths, each section is
rewritten like its separate projection, and the sections are fused again.

Per-head q/k norms (Qwen3, Gemma 3: one ``head_dim`` weight shared by all heads) need nothing:
a zero head's query is zero before and after its norm, a KV copy is normed like its original.
Norms over the whole projection (OLMo-2) cannot be padded exactly (zero heads and copies change
the root-mean-square they divide by), so the vLLM plugin refuses that layout.
Torch only: usable without vLLM (the tests check the rewrite in transformers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

import torch

from slimgpt_core.served_layout import LayerLayout

__all__ = ["rewrite_tensor", "rewrite_weights"]

_LAYER_TENSOR = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(self_attn\.(?:q|k|v|o|qkv)_proj|mlp\.(?:gate|up|down|gate_up)_proj)"
    r"\.(weight|bias)$")


def _gather_heads(t: torch.Tensor, source: Sequence[int | None], head_dim: int,
                  dim: int) -> torch.Tensor:
    """Heads of ``t`` along ``dim`` (blocks of ``head_dim``) in ``source`` order; None -> zeros."""
    heads = t.unflatten(dim, (-1, head_dim))
    index = torch.tensor([0 if s is None else s for s in source], dtype=torch.long,
                         device=t.device)
    out = heads.index_select(dim, index)
    missing = [i for i, s in enumerate(source) if s is None]
    if missing:
        out = out.clone()
        out.index_fill_(dim, torch.tensor(missing, dtype=torch.long, device=t.device), 0)
    return out.flatten(dim, dim + 1).contiguous()


def _pad(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _qkv_sections(lay: LayerLayout, head_dim: int) -> list[int]:
    w = lay.widths
    return [w.num_heads * head_dim, w.num_kv_heads * head_dim, w.num_kv_heads * head_dim]


def rewrite_tensor(name: str, tensor: torch.Tensor, layouts: Sequence[LayerLayout],
                   head_dim: int) -> torch.Tensor:
    """``tensor`` as the served layout of its layer needs it (unchanged if not a layer tensor
    or if the layer is served as it is)."""
    m = _LAYER_TENSOR.search(name)
    if m is None:
        return tensor
    layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
    if layer >= len(layouts):
        return tensor
    lay = layouts[layer]
    if lay.is_identity:
        return tensor
    proj = module.rsplit(".", 1)[1]
    if proj == "qkv_proj":  # rows [q heads | k heads | v heads] of the pruned widths
        q, k, v = tensor.split(_qkv_sections(lay, head_dim), dim=0)
        return torch.cat([_gather_heads(q, lay.q_source, head_dim, 0),
                          _gather_heads(k, lay.kv_source, head_dim, 0),
                          _gather_heads(v, lay.kv_source, head_dim, 0)], dim=0)
    if proj == "gate_up_proj":  # rows [gate | up], each padded on its own
        gate, up = tensor.split(lay.widths.intermediate_size, dim=0)
        return torch.cat([_pad(gate, lay.intermediate_size, 0),
                          _pad(up, lay.intermediate_size, 0)], dim=0)
    if proj == "q_proj":  # rows are query heads (weight and bias)
        return _gather_heads(tensor, lay.q_source, head_dim, 0)
    if proj in ("k_proj", "v_proj"):
        return _gather_heads(tensor, lay.kv_source, head_dim, 0)
    if proj == "o_proj":  # columns are query heads; its bias (if any) is per hidden unit
        return tensor if kind == "bias" else _gather_heads(tensor, lay.q_source, head_dim, 1)
    if proj in ("gate_proj", "up_proj"):
        return _pad(tensor, lay.intermediate_size, 0)
    # down_proj: columns are channels; its bias is per hidden unit
    return tensor if kind == "bias" else _pad(tensor, lay.intermediate_size, 1)


def rewrite_weights(weights: Iterable[tuple[str, torch.Tensor]],
                    layouts: Sequence[LayerLayout], head_dim: int
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`rewrite_tensor` over a stream of checkpoint tensors."""
    for name, tensor in weights:
        yield name, rewrite_tensor(name, tensor, layouts, head_dim)
