"""Local search after the greedy pass: swap a removed and a kept unit while the layer's
reconstruction error drops (OSSCAR-style, arXiv 2403.12983).

State (the greedy pass leaves exactly this): ``W`` the compensated weights, zero on removed
columns, and ``hinv = (H_KK)^-1`` of the kept columns ``K`` at full size (zero elsewhere), with
``H`` the damped Hessian. With ``B = W0 H`` (``W0`` the weights before pruning) the error of a
kept set is ``tr(W0 H W0^T) - tr(B_K hinv B_K^T)``, and both moves are low-rank updates:

* restoring a unit ``G``: ``V = hinv H_:G``, ``S = H_GG - H_G: V`` (a Schur complement),
  ``U = B_G - W H_:G``; the error drops by ``tr(U S^-1 U^T)`` and
  ``W <- W - U S^-1 V^T``, ``W_G = U S^-1``, ``hinv`` grows by the block inverse;
* removing a unit ``R``: the usual OBS step (:func:`slimgpt_core.obs.remove_group`).

For single channels every (restore, remove) pair is scored in closed form at once (three
matrix products); heads are few, so their pairs are scored one by one with the block formulas.
Every accepted swap lowers the exact error; the search stops when no swap gains more than
``tol`` of the current error or after ``max_swaps`` swaps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimgpt_core.obs import remove_group


@dataclass(frozen=True)
class SwapResult:
    removed: torch.Tensor  # bool mask of removed columns after the search
    swaps: int
    error_before: float  # 2/n ||(W0 - W) X||^2 before and after the search
    error_after: float


def damped_hessian(hessian: torch.Tensor, damping: float, dead: torch.Tensor) -> torch.Tensor:
    """The matrix whose inverse :func:`slimgpt_core.obs.damped_inverse` computed."""
    H = hessian.clone()
    diag = torch.diagonal(H)
    diag[dead] = 1.0
    diag += damping
    return H


def _error(W0: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    delta = W0 - W
    return float(((delta @ H) * delta).sum())


def _restore(W: torch.Tensor, hinv: torch.Tensor, H: torch.Tensor, B: torch.Tensor,
             group: torch.Tensor) -> None:
    """Put the columns ``group`` back (optimally refitted), updating ``W`` and ``hinv``."""
    h = H[:, group]  # (in, g)
    V = hinv @ h  # zero outside the kept set, because hinv is
    S = H[group][:, group] - h.T @ V
    S = (S + S.T) / 2
    U = B[:, group] - W @ h  # (out, g)
    S_inv = torch.linalg.inv(S)
    US = U @ S_inv
    W.sub_(US @ V.T)
    W[:, group] = US
    hinv.add_(V @ S_inv @ V.T)
    cross = -(V @ S_inv)  # (in, g)
    hinv[:, group] = cross
    hinv[group, :] = cross.T
    hinv[group[:, None], group[None, :]] = S_inv
    hinv.copy_((hinv + hinv.T) / 2)


def swap_channels(W0: torch.Tensor, W: torch.Tensor, hinv: torch.Tensor, H: torch.Tensor,
                  removed: torch.Tensor, *, max_swaps: int, tol: float = 1e-4) -> SwapResult:
    """Best-improvement single-channel swaps; ``W``/``hinv`` are updated in place."""
    removed = removed.clone()
    B = W0 @ H
    before = _error(W0, W, H)
    current = before
    swaps = 0
    while swaps < max_swaps and current > 0:
        S_idx = removed.nonzero().squeeze(1)
        K = ~removed
        if S_idx.numel() == 0 or not bool(K.any()):
            break
        h = H[:, S_idx]  # (in, s)
        V = hinv @ h  # (in, s); rows outside K are zero
        s = torch.diagonal(H)[S_idx] - (h * V).sum(0)  # (s,)
        U = B[:, S_idx] - W @ h  # (out, s)
        gain = U.pow(2).sum(0) / s  # error drop of restoring each removed channel
        P = W.T @ U  # (in, s): W_r . u_k
        w2 = W.pow(2).sum(0)[:, None]
        m = torch.diagonal(hinv)[:, None]
        num = w2 - 2 * V * P / s + V.pow(2) * U.pow(2).sum(0) / s.pow(2)
        den = m + V.pow(2) / s
        delta = num / den - gain  # error change of (restore k, then remove r)
        delta[~K] = float("inf")
        # In fp32 the Schur complement s of a channel that the kept ones nearly explain can
        # cancel to <= 0 (or hinv's diagonal drift there): such a restore is not trustworthy.
        delta[:, s <= 0] = float("inf")
        delta[torch.diagonal(hinv) <= 0] = float("inf")
        delta[~torch.isfinite(delta)] = float("inf")
        best = int(torch.argmin(delta))
        r, k = divmod(best, S_idx.numel())
        if not float(delta[r, k]) < -tol * current:
            break
        k_col = S_idx[k : k + 1]
        _restore(W, hinv, H, B, k_col)
        remove_group(W, hinv, torch.tensor([r], device=W.device))
        removed[k_col] = False
        removed[r] = True
        current = _error(W0, W, H)
        swaps += 1
    return SwapResult(removed, swaps, before, current)


def swap_groups(W0: torch.Tensor, W: torch.Tensor, hinv: torch.Tensor, H: torch.Tensor,
                units: torch.Tensor, removed_units: torch.Tensor,
                allowed: Callable[[torch.Tensor], bool], *, max_swaps: int,
                tol: float = 1e-4) -> tuple[torch.Tensor, int, float, float]:
    """Best-improvement swaps of whole units (rows of ``units``: column indices, e.g. heads).

    ``allowed(removed_units)`` says whether a candidate removed set is valid (GQA policies).
    Returns the removed-unit mask, the number of swaps and the error before/after.
    """
    removed_units = removed_units.clone()
    B = W0 @ H
    before = _error(W0, W, H)
    current = before
    swaps = 0
    while swaps < max_swaps and current > 0:
        best: tuple[float, int, int, torch.Tensor, torch.Tensor] | None = None
        for k in removed_units.nonzero().squeeze(1).tolist():
            for r in (~removed_units).nonzero().squeeze(1).tolist():
                trial = removed_units.clone()
                trial[k], trial[r] = False, True
                if not allowed(trial):
                    continue
                Wt, ht = W.clone(), hinv.clone()
                try:
                    _restore(Wt, ht, H, B, units[k])
                    remove_group(Wt, ht, units[r])
                except torch.linalg.LinAlgError:
                    # fp32 cancellation made this pair's blocks indefinite (outlier-heavy
                    # Hessians do it): not a trustworthy move, so not a candidate.
                    continue
                err = _error(W0, Wt, H)
                if math.isfinite(err) and (best is None or err < best[0]):
                    best = (err, k, r, Wt, ht)
        if best is None or best[0] >= current * (1 - tol):
            break
        _, k, r, Wt, ht = best
        W.copy_(Wt)  # the evaluated move itself, not a recomputation of it
        hinv.copy_(ht)
        removed_units[k], removed_units[r] = False, True
        current = _error(W0, W, H)
        swaps += 1
    return removed_units, swaps, before, current
