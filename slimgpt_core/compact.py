"""Make pruned layers physically smaller: slice the projections to the kept heads/channels."""

from __future__ import annotations

import torch
from torch import nn

from slimgpt_core.modeling_slimgpt import set_attention_layout


def _sliced_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _rows(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    idx = torch.tensor(heads, dtype=torch.long, device=device)
    return (idx[:, None] * head_dim + torch.arange(head_dim, device=device)[None, :]).reshape(-1)


def _take_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    bias = linear.bias[rows] if linear.bias is not None else None
    return _sliced_linear(linear, linear.weight[rows], bias)


def compact_attention(attn: nn.Module, kept_heads: list[int], kept_kv_heads: list[int],
                      kv_index: list[int], o_weight: torch.Tensor) -> None:
    """Keep only ``kept_heads`` (and the KV heads they read); ``o_weight`` is the full-width
    compensated ``o_proj`` weight."""
    d = attn.head_dim
    device = attn.q_proj.weight.device
    q_rows = _rows(kept_heads, d, device)
    kv_rows = _rows(kept_kv_heads, d, device)
    attn.q_proj = _take_rows(attn.q_proj, q_rows)
    attn.k_proj = _take_rows(attn.k_proj, kv_rows)
    attn.v_proj = _take_rows(attn.v_proj, kv_rows)
    o_bias = attn.o_proj.bias
    attn.o_proj = _sliced_linear(attn.o_proj, o_weight[:, q_rows.to(o_weight.device)], o_bias)
    set_attention_layout(attn, len(kept_heads), len(kept_kv_heads), kv_index)


def compact_mlp(mlp: nn.Module, kept_channels: list[int], down_weight: torch.Tensor) -> None:
    """Keep only ``kept_channels``; ``down_weight`` is the full-width compensated weight."""
    idx = torch.tensor(kept_channels, dtype=torch.long, device=mlp.gate_proj.weight.device)
    mlp.gate_proj = _take_rows(mlp.gate_proj, idx)
    mlp.up_proj = _take_rows(mlp.up_proj, idx)
    mlp.down_proj = _sliced_linear(mlp.down_proj, down_weight[:, idx.to(down_weight.device)],
                                   mlp.down_proj.bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(kept_channels)
