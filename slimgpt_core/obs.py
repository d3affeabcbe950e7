"""Optimal Brain Surgeon column removal with compensation, the arithmetic core of SlimGPT.

Notation (SparseGPT / SlimGPT): a linear layer ``W`` (out x in) sees inputs ``X`` (in x n) and
``H = 2 X X^T / n``. Removing the column group ``G`` and letting the other columns absorb the
loss is the least-squares problem ``min ||(W - W') X||^2 s.t. W'[:, G] = 0`` whose solution is

    W' = W - W[:, G] (Hinv_GG)^-1 Hinv_G,:          (compensation)
    err = tr(W[:, G] (Hinv_GG)^-1 W[:, G]^T)        (= 2/n ||(W - W') X||^2)

and the inverse Hessian of the surviving columns is the Schur complement

    Hinv_RR <- Hinv_RR - Hinv_RG (Hinv_GG)^-1 Hinv_GR   (rank-|G| downdate)

All matrices stay at full size: removed columns are zero rows/columns of ``Hinv`` and zero
columns of ``W``, so column indices never need remapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimgpt_core.hessian import check_finite

#: How many times a failed Cholesky is retried, each time with ten times more damping.
MAX_DAMPING_RETRIES = 6


@dataclass(frozen=True)
class InverseHessian:
    """``H^-1`` of a damped Hessian and what it took to get it."""

    hinv: torch.Tensor
    damping: float
    retries: int
    dead: torch.Tensor  # bool mask of input channels that never fired
    #: ``damping / mean(diag H)``: the requested percdamp, or what the retries raised it to.
    #: Past ~1 the inverse is close to a scaled identity: OBS has become magnitude pruning.
    percdamp: float = 0.0


def damped_inverse(hessian: torch.Tensor, percdamp: float) -> InverseHessian:
    """Invert ``H + percdamp * mean(diag H) * I`` by Cholesky, adding damping until it works.

    Input channels that never fired (zero diagonal) get a unit diagonal: their columns cannot
    influence the output on the calibration data, so any finite value keeps the algebra sound.
    A non-finite ``hessian`` raises :class:`~slimgpt_core.errors.NonFiniteHessianError` at once:
    no damping can repair it.
    """
    check_finite(hessian, "Hessian")
    H = hessian.clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    mean_diag = diag.mean().item()
    damping = percdamp * mean_diag
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for retries in range(MAX_DAMPING_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(H + damping * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            return InverseHessian(hinv, damping, retries, dead, damping / mean_diag)
        damping = max(damping, 1e-8 * mean_diag) * 10.0
    raise torch.linalg.LinAlgError(
        f"Hessian stayed indefinite after {MAX_DAMPING_RETRIES} damping increases "
        f"(last damping {damping:.3g}); the calibration data may be degenerate"
    )


def _group_cholesky(block: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of (a batch of) ``Hinv_GG`` blocks, with a jitter fallback.

    The blocks are principal submatrices of a positive-definite matrix, so they are positive
    definite in exact arithmetic; after many fp32 downdates a tiny jitter can be needed.
    """
    chol, info = torch.linalg.cholesky_ex(block)
    if bool((info != 0).any()):
        scale = torch.diagonal(block, dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-12)
        eye = torch.eye(block.shape[-1], dtype=block.dtype, device=block.device)
        chol = torch.linalg.cholesky(block + 1e-6 * scale[..., None, None] * eye)
    return chol


def group_errors(W: torch.Tensor, hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Exact joint OBS error of removing each column group, all groups at once.

    ``groups`` is (k, g): k candidate groups of g column indices each (for heads: one row per
    head). One batched ("grouped") Cholesky ``L_k L_k^T = Hinv[G_k, G_k]`` gives
    ``err_k = tr(W_Gk Hinv_GkGk^-1 W_Gk^T) = ||L_k^-1 W_Gk^T||_F^2``.
    """
    blocks = hinv[groups[:, :, None], groups[:, None, :]]  # (k, g, g)
    chol = _group_cholesky(blocks)
    w = W[:, groups].permute(1, 2, 0)  # (k, g, out)
    z = torch.linalg.solve_triangular(chol, w, upper=False)
    return z.pow(2).sum(dim=(1, 2))


def channel_errors(W: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """Single-column OBS errors ``||W[:, j]||^2 / Hinv_jj`` for every column."""
    return W.pow(2).sum(dim=0) / torch.diagonal(hinv)


def remove_group(W: torch.Tensor, hinv: torch.Tensor, group: torch.Tensor) -> float:
    """Remove columns ``group`` from ``W`` in place, compensating, and downdate ``hinv``.

    In SparseGPT's terms: with the group permuted to the front and ``U`` the upper Cholesky
    factor of ``Hinv``, the group's rows of ``U`` are ``U_GG^-T Hinv_G,:``; the local update
    ``W_G U_GG^-1`` followed by the global update ``(.) U_G,:`` is exactly the compensation
    ``W_G Hinv_GG^-1 Hinv_G,:`` computed here through one Cholesky solve. Returns the error.
    """
    hinv_gg = hinv[group][:, group]
    chol = _group_cholesky(hinv_gg)
    w_g = W[:, group]
    hinv_g = hinv[group, :]
    coef = torch.cholesky_solve(hinv_g, chol)  # Hinv_GG^-1 Hinv_G,:   (g, in)
    err = torch.linalg.solve_triangular(chol, w_g.T, upper=False).pow(2).sum().item()
    W.sub_(w_g @ coef)
    W[:, group] = 0.0
    hinv.sub_(hinv_g.T @ coef)
    hinv[group, :] = 0.0
    hinv[:, group] = 0.0
    # Keep the surviving block symmetric so later Cholesky factorisations see what they expect.
    hinv.copy_((hinv + hinv.T) / 2)
    return err


def output_error(W0: torch.Tensor, W1: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W0 - W1) H (W0 - W1)^T) / tr(W0 H W0^T)``: relative output error on the data."""
    delta = W0 - W1
    num = ((delta @ hessian) * delta).sum()
    den = ((W0 @ hessian) * W0).sum().clamp_min(1e-30)
    return float(num / den)
