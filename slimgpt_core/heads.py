"""Batched Greedy Pruning of attention heads on ``o_proj`` (SlimGPT sec. 3.1).

Every candidate unit is scored with its exact joint OBS error from one batched Cholesky of the
per-unit diagonal blocks of ``H^-1``; the cheapest unit goes, the other columns are compensated,
``H^-1`` is downdated, and the scores are recomputed. What a unit is depends on the GQA policy:

* ``group``    a whole KV group: its query heads and the key/value head they share;
* ``balanced`` one query head, but every KV group loses the same number of query heads
               (all KV heads kept, so the layer stays a standard grouped-query layer);
* ``free``     any query head, with per-layer KV indices (the ``hetero`` artifact); a KV
               group is emptied (its KV head dropped) only when the count to remove leaves
               no other choice -- ``max(0, removed - (heads - kv_heads))`` groups -- so the
               size is known before pruning and the dry-run estimate stays exact.

Multi-head attention is the case of one query head per group, where all three coincide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimgpt_core.obs import damped_inverse, group_errors, remove_group
from slimgpt_core.schedule import kv_groups_emptied


@dataclass(frozen=True)
class HeadPruning:
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kv_index: list[int]  # per kept query head: position of its KV head among kept_kv_heads
    error: float  # summed OBS error of the removed units
    damping: float
    retries: int
    percdamp: float = 0.0  # damping actually used, as a share of mean(diag H)


def _head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Column indices of ``o_proj`` for each head: (len(heads), head_dim)."""
    offsets = torch.arange(head_dim, device=heads.device)
    return heads[:, None] * head_dim + offsets[None, :]


def prune_heads(
    W: torch.Tensor,
    hessian: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    heads_to_remove: int,
    policy: str,
    percdamp: float,
) -> HeadPruning:
    """Remove ``heads_to_remove`` query heads from ``W`` (``o_proj.weight``, fp32) in place."""
    group_size = num_heads // num_kv_heads
    if group_size == 1:
        policy = "group"
    inv = damped_inverse(hessian, percdamp)
    hinv = inv.hinv
    W[:, inv.dead] = 0.0
    device = W.device
    alive = torch.ones(num_heads, dtype=torch.bool, device=device)
    error = 0.0

    if policy == "group":
        if heads_to_remove % group_size:
            raise ValueError(f"policy 'group' removes whole groups of {group_size} heads, "
                             f"not {heads_to_remove}")
        # A unit is a KV group: the columns of all its query heads.
        group_heads = torch.arange(num_heads, device=device).view(num_kv_heads, group_size)
        unit_cols = _head_columns(group_heads.reshape(-1), head_dim).view(num_kv_heads, -1)
        unit_alive = torch.ones(num_kv_heads, dtype=torch.bool, device=device)
        for _ in range(heads_to_remove // group_size):
            candidates = unit_alive.nonzero().squeeze(1)
            scores = group_errors(W, hinv, unit_cols[candidates])
            best = candidates[int(torch.argmin(scores))]
            error += remove_group(W, hinv, unit_cols[best])
            unit_alive[best] = False
            alive[group_heads[best]] = False
    elif policy in ("balanced", "free"):
        quota = heads_to_remove // num_kv_heads if policy == "balanced" else heads_to_remove
        if policy == "balanced" and heads_to_remove % num_kv_heads:
            raise ValueError(f"policy 'balanced' removes the same number of heads from each of "
                             f"{num_kv_heads} groups, not {heads_to_remove} in total")
        removed_per_group = torch.zeros(num_kv_heads, dtype=torch.long, device=device)
        head_group = torch.arange(num_heads, device=device) // group_size
        all_cols = _head_columns(torch.arange(num_heads, device=device), head_dim)
        may_empty = kv_groups_emptied(num_heads, num_kv_heads, heads_to_remove)
        for _ in range(heads_to_remove):
            open_group = removed_per_group[head_group] < quota
            if policy == "free" and int((removed_per_group == group_size).sum()) >= may_empty:
                # No more groups may be emptied: a group's last query head stays.
                open_group &= removed_per_group[head_group] < group_size - 1
            candidates = (alive & open_group).nonzero().squeeze(1)
            scores = group_errors(W, hinv, all_cols[candidates])
            best = candidates[int(torch.argmin(scores))]
            error += remove_group(W, hinv, all_cols[best])
            alive[best] = False
            removed_per_group[head_group[best]] += 1
    else:
        raise ValueError(f"unknown GQA policy {policy!r}")

    kept = alive.nonzero().squeeze(1).tolist()
    kept_kv = sorted({h // group_size for h in kept})
    position = {kv: i for i, kv in enumerate(kept_kv)}
    return HeadPruning(
        kept_heads=kept,
        kept_kv_heads=kept_kv,
        kv_index=[position[h // group_size] for h in kept],
        error=error,
        damping=inv.damping,
        retries=inv.retries,
        percdamp=inv.percdamp,
    )
