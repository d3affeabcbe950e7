"""The SlimGPT authors' released choices, re-created as swappable ablations of our driver.

Read from the authors' public code (``slim_utils/slimgpt.py`` and ``model_slimming.py`` of the
SlimGPT release, as found in copies on GitHub; its ``slim_dataset.py`` was not found, so the
calibration sampling is taken from the SparseGPT loaders that release builds on) and written
here in our own terms. Nothing in this file is used by ``slimgpt_core``: each function replaces
one piece of our pipeline so that the quality benchmark can switch one choice at a time.

Their choices, one by one:

* **Schedule** (``authors_plan``): ``s_i = s_min + (s_max - s_min) * ln(1 + i) / ln(32)`` for
  layer ``i`` -- the 32 is hard-coded (LLaMA-7B's depth), nothing is solved for a parameter
  count, and every layer loses ``round(H * s_i)`` query heads and ``round(I * s_i)`` FFN
  channels: the same share of heads and channels, whatever a head costs. Their README prunes
  LLaMA-7B by 20% with ``s_min = 0.0625, s_max = 0.25`` (``s_min = s_max / 4``) and
  ``percdamp 0``.
* **Head scoring** (``authors_prune_heads``): a head's score is the sum over its columns of
  ``||W_j||^2 / L_jj^2`` with ``L`` the Cholesky factor of the head's diagonal block of
  ``H^-1`` -- an approximation of the joint error (ours is exact: ``||L^-1 W_G^T||_F^2``).
  One head per step, exact OBS compensation, ``H^-1`` recomputed from the masked Hessian.
* **KV heads** (same function): the model is run in multi-head form (every query head with
  its own copy of its KV head), so query heads go freely and a KV head disappears only when
  no query head reads it any more.
* **Group size** (``authors_prune_channels``): ``b_0 = (T - 512) // 2`` with ``T`` the
  channels to remove, then ``b_{k+1} = (b_k - 512) // 2``; each group is
  ``min(left, max(b_k, 64), 1024)`` -- the shrinking follows the *initial* target, not what
  is left (ours: ``(left - 512) // 2``).
* **Calibration sampling** (``authors_windows``): uniformly random window starts in the
  tokenized text (SparseGPT's loaders; documents of C4 become one stream here because the
  shared text has no documents longer than a window).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from slimgpt_core.calibration import tokenize
from slimgpt_core.channels import ChannelPruning
from slimgpt_core.heads import HeadPruning
from slimgpt_core.obs import damped_inverse, remove_group
from slimgpt_core.schedule import LayerPlan, ModelShape, PruningPlan

#: The depth their log schedule divides by, whatever the model's depth.
AUTHORS_LOG_DEPTH = 32


def authors_ratios(num_layers: int, s_min: float, s_max: float) -> list[float]:
    return [s_min + (s_max - s_min) / math.log(AUTHORS_LOG_DEPTH) * math.log(1 + i)
            for i in range(num_layers)]


def authors_plan(shape: ModelShape, s_min: float, s_max: float) -> PruningPlan:
    """Their per-layer counts: the same share of query heads and of FFN channels per layer.

    KV heads are planned as kept; the pruner may still empty a group, so the real size is
    counted on the pruned model (the benchmark matches other variants to that count).
    """
    layers = []
    for i, s in enumerate(authors_ratios(shape.num_layers, s_min, s_max)):
        heads = min(round(shape.num_heads * s), shape.num_heads - 1)
        channels = round(shape.intermediate_size * s)
        kept_h, kept_c = shape.num_heads - heads, shape.intermediate_size - channels
        layers.append(LayerPlan(
            index=i, ratio=s, heads_removed=heads, kv_heads_removed=0, channels_removed=channels,
            heads_kept=kept_h, kv_heads_kept=shape.num_kv_heads, channels_kept=kept_c,
            params_before=shape.dense_layer_params,
            params_after=shape.layer_params(kept_h, shape.num_kv_heads, kept_c)))
    ratios = tuple(lp.ratio for lp in layers)
    return PruningPlan(shape, s_max, "authors-log32", "free", ratios, tuple(layers),
                       ratios[0], ratios[-1])


def _head_cols(head: int, head_dim: int, device: torch.device) -> torch.Tensor:
    return torch.arange(head * head_dim, (head + 1) * head_dim, device=device)


def authors_prune_heads(W: torch.Tensor, hessian: torch.Tensor, *, num_heads: int,
                        num_kv_heads: int, head_dim: int, heads_to_remove: int, policy: str,
                        percdamp: float, **_: Any) -> HeadPruning:
    """Approximate head scores (sum of per-column scores with the block Cholesky diagonal),
    one head per step, free query-head removal; a KV head goes when its group is empty."""
    inv = damped_inverse(hessian, percdamp)
    hinv = inv.hinv
    W[:, inv.dead] = 0.0
    alive = torch.ones(num_heads, dtype=torch.bool)
    error = 0.0
    for _step in range(heads_to_remove):
        scores = torch.full((num_heads,), float("inf"))
        for h in alive.nonzero().squeeze(1).tolist():
            cols = _head_cols(h, head_dim, W.device)
            diag = torch.diagonal(torch.linalg.cholesky(hinv[cols][:, cols])).pow(2)
            scores[h] = float((W[:, cols].pow(2) / diag[None, :]).sum())
        best = int(torch.argmin(scores))
        error += remove_group(W, hinv, _head_cols(best, head_dim, W.device))
        alive[best] = False
    group = num_heads // num_kv_heads
    kept = alive.nonzero().squeeze(1).tolist()
    kept_kv = sorted({h // group for h in kept})
    position = {kv: i for i, kv in enumerate(kept_kv)}
    return HeadPruning(kept, kept_kv, [position[h // group] for h in kept], error,
                       inv.damping, inv.retries)


def authors_group_sizes(target: int, floor: int = 64, ceiling: int = 1024) -> list[int]:
    sizes, left, block = [], target, (target - 512) // 2
    while left > 0:
        size = min(left, max(block, floor), ceiling)
        sizes.append(size)
        left -= size
        block = (block - 512) // 2
    return sizes


def authors_prune_channels(W: torch.Tensor, hessian: torch.Tensor, *, channels_to_remove: int,
                           percdamp: float, **_: Any) -> ChannelPruning:
    inv = damped_inverse(hessian, percdamp)
    hinv = inv.hinv
    W[:, inv.dead] = 0.0
    alive = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    error = 0.0
    sizes = authors_group_sizes(channels_to_remove)
    for g in sizes:
        scores = (W.pow(2).sum(0) / torch.diagonal(hinv)).masked_fill(~alive, float("inf"))
        group = torch.argsort(scores, stable=True)[:g]
        error += remove_group(W, hinv, group)
        alive[group] = False
    return ChannelPruning(alive.nonzero().squeeze(1).tolist(), error, inv.damping, inv.retries,
                          sizes)


def authors_windows(text: str, tokenizer: Any, num_samples: int, seq_len: int,
                    seed: int = 0) -> torch.Tensor:
    """SparseGPT-style: ``random.seed(seed)``, start ``randint(0, N - L - 1)`` per window."""
    ids = tokenize(text, tokenizer)
    random.seed(seed)
    starts = [random.randint(0, ids.numel() - seq_len - 1) for _ in range(num_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])
