"""Make pruned layers physically smaller: slice the projections to the kept heads/channels.

What is sliced alongside the heads and channels follows the family's
:class:`~slimgpt_core.families.Layout`: biases always, the rows of fused ``qkv_proj`` /
``gate_up_proj`` matrices section by section, and q/k norms that span the whole projection.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from slimgpt_core.modeling_slimgpt import set_attention_layout, set_mlp_width


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


def _slice_norm(norm: nn.Module, rows: torch.Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight.data[rows].clone(),
                               requires_grad=norm.weight.requires_grad)


def compact_attention(attn: nn.Module, layout: Mapping[str, str], kept_heads: list[int],
                      kept_kv_heads: list[int], kv_index: list[int],
                      o_weight: torch.Tensor) -> None:
    """Keep only ``kept_heads`` (and the KV heads they read); ``o_weight`` is the full-width
    compensated ``o_proj`` weight."""
    d = attn.head_dim
    num_heads = attn.o_proj.in_features // d
    q_rows = _rows(kept_heads, d, o_weight.device)
    if layout.get("qkv", "separate") == "fused":
        device = attn.qkv_proj.weight.device
        num_kv = (attn.qkv_proj.out_features - num_heads * d) // (2 * d)
        kv_rows = _rows(kept_kv_heads, d, device)
        q_dev = q_rows.to(device)
        rows = torch.cat([q_dev, num_heads * d + kv_rows, (num_heads + num_kv) * d + kv_rows])
        attn.qkv_proj = _take_rows(attn.qkv_proj, rows)
    else:
        device = attn.q_proj.weight.device
        q_dev, kv_rows = q_rows.to(device), _rows(kept_kv_heads, d, device)
        attn.q_proj = _take_rows(attn.q_proj, q_dev)
        attn.k_proj = _take_rows(attn.k_proj, kv_rows)
        attn.v_proj = _take_rows(attn.v_proj, kv_rows)
    if layout.get("head_norm", "none") == "projection":
        _slice_norm(attn.q_norm, q_dev.to(attn.q_norm.weight.device))
        _slice_norm(attn.k_norm, kv_rows.to(attn.k_norm.weight.device))
    attn.o_proj = _sliced_linear(attn.o_proj, o_weight[:, q_rows], attn.o_proj.bias)
    set_attention_layout(attn, len(kept_heads), len(kept_kv_heads), kv_index)


def compact_mlp(mlp: nn.Module, layout: Mapping[str, str], kept_channels: list[int],
                down_weight: torch.Tensor) -> None:
    """Keep only ``kept_channels``; ``down_weight`` is the full-width compensated weight."""
    if layout.get("ffn", "gated") == "fused":
        device = mlp.gate_up_proj.weight.device
        idx = torch.tensor(kept_channels, dtype=torch.long, device=device)
        width = mlp.gate_up_proj.out_features // 2
        mlp.gate_up_proj = _take_rows(mlp.gate_up_proj, torch.cat([idx, width + idx]))
    else:
        idx = torch.tensor(kept_channels, dtype=torch.long, device=mlp.gate_proj.weight.device)
        mlp.gate_proj = _take_rows(mlp.gate_proj, idx)
        mlp.up_proj = _take_rows(mlp.up_proj, idx)
    mlp.down_proj = _sliced_linear(mlp.down_proj, down_weight[:, idx.to(down_weight.device)],
                                   mlp.down_proj.bias)
    set_mlp_width(mlp, len(kept_channels))
