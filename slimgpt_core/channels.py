"""Dynamic Group Size pruning of FFN channels on ``down_proj`` (SlimGPT sec. 3.2).

Channels are scored one by one (``||W_j||^2 / Hinv_jj``) but removed jointly in groups, with
exact compensation and a rank-g downdate of ``H^-1`` after each group. Groups start large,
where removing many channels at once costs little accuracy because their scores are far from
the decision boundary, and shrink towards ``min_group`` as the last, closest calls are made
(``min_group=1`` is exact greedy OBS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimgpt_core.obs import channel_errors, damped_inverse, remove_group


@dataclass(frozen=True)
class ChannelPruning:
    kept_channels: list[int]
    error: float
    damping: float
    retries: int
    group_sizes: list[int]
    percdamp: float = 0.0  # damping actually used, as a share of mean(diag H)


def group_size(remaining: int, min_group: int, max_group: int) -> int:
    """Size of the next group with ``remaining`` channels still to remove.

    ``min(max_group, (remaining - 512) / 2)``: about half of what is left beyond a reserve of
    512 channels that are then removed in groups of ``min_group``.
    """
    size = min(max_group, (remaining - 512) // 2)
    return max(1, min(remaining, max(size, min_group)))


def prune_channels(
    W: torch.Tensor,
    hessian: torch.Tensor,
    *,
    channels_to_remove: int,
    percdamp: float,
    min_group: int = 64,
    max_group: int = 1024,
) -> ChannelPruning:
    """Remove ``channels_to_remove`` input channels of ``W`` (``down_proj.weight``, fp32)."""
    inv = damped_inverse(hessian, percdamp)
    hinv = inv.hinv
    W[:, inv.dead] = 0.0
    alive = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    error = 0.0
    sizes: list[int] = []
    remaining = channels_to_remove
    while remaining > 0:
        g = group_size(remaining, min_group, max_group)
        scores = channel_errors(W, hinv).masked_fill(~alive, float("inf"))
        # A stable sort makes ties (e.g. dead channels, all scoring zero) resolve by index.
        group = torch.argsort(scores, stable=True)[:g]
        error += remove_group(W, hinv, group)
        alive[group] = False
        sizes.append(g)
        remaining -= g
    return ChannelPruning(
        kept_channels=alive.nonzero().squeeze(1).tolist(),
        error=error,
        damping=inv.damping,
        retries=inv.retries,
        group_sizes=sizes,
        percdamp=inv.percdamp,
    )
