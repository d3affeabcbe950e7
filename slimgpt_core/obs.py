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

from collections.abc import Iterator
from contextlib import contextmanager
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


#: Columns of ``H^-1`` computed per triangular solve: bounds the temporaries of the inverse to
#: two ``d x block`` panels besides ``H``, its factor and ``H^-1`` itself.
INVERSE_BLOCK = 4096


def damped_inverse(hessian: torch.Tensor, percdamp: float) -> InverseHessian:
    """Invert ``H + percdamp * mean(diag H) * I`` by Cholesky, adding damping until it works.

    Input channels that never fired (zero diagonal) get a unit diagonal: their columns cannot
    influence the output on the calibration data, so any finite value keeps the algebra sound.
    A non-finite ``hessian`` raises :class:`~slimgpt_core.errors.NonFiniteHessianError` at once:
    no damping can repair it.

    Memory: besides ``hessian`` (left untouched), at most two full-size matrices live at once,
    the Cholesky factor and the inverse being built from it panel by panel, and only the
    inverse remains (at FFN width 28672 in fp32 each is 3.3 GB, so this matters).
    """
    check_finite(hessian, "Hessian")
    diag = torch.diagonal(hessian)
    dead = diag == 0
    base_diag = torch.where(dead, torch.ones_like(diag), diag)
    mean_diag = base_diag.mean().item()
    damping = percdamp * mean_diag
    for retries in range(MAX_DAMPING_RETRIES + 1):
        work = hessian.clone()
        torch.diagonal(work).copy_(base_diag + damping)
        chol, info = torch.linalg.cholesky_ex(work)
        del work
        if int(info) == 0:
            hinv = _inverse_from_cholesky(chol)
            return InverseHessian(hinv, damping, retries, dead, damping / mean_diag)
        del chol
        damping = max(damping, 1e-8 * mean_diag) * 10.0
    raise torch.linalg.LinAlgError(
        f"Hessian stayed indefinite after {MAX_DAMPING_RETRIES} damping increases "
        f"(last damping {damping:.3g}); the calibration data may be degenerate"
    )


def _inverse_from_cholesky(chol: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^-1`` from the lower factor ``L``, one panel of columns at a time.

    Column panel ``j`` of the inverse solves ``L L^T Z = E_j``; the forward solve only touches
    rows from the panel's first column on (the rows above are zero), which saves a third of
    the work of a plain ``cholesky_inverse`` and never needs an identity or a factor copy.
    """
    d = chol.shape[0]
    hinv = torch.empty_like(chol, memory_format=torch.contiguous_format)
    upper = chol.mT
    for start in range(0, d, INVERSE_BLOCK):
        stop = min(start + INVERSE_BLOCK, d)
        y = torch.zeros(d, stop - start, dtype=chol.dtype, device=chol.device)
        torch.diagonal(y[start:]).fill_(1.0)
        y[start:] = torch.linalg.solve_triangular(chol[start:, start:], y[start:], upper=False)
        hinv[:, start:stop] = torch.linalg.solve_triangular(upper, y, upper=True)
        del y
    _symmetrize_(hinv)
    return hinv


def _symmetrize_(a: torch.Tensor) -> None:
    """``a <- (a + a^T) / 2`` in place, block by block (no full-size temporary)."""
    d = a.shape[0]
    for i in range(0, d, INVERSE_BLOCK):
        bi = slice(i, min(i + INVERSE_BLOCK, d))
        for j in range(i, d, INVERSE_BLOCK):
            bj = slice(j, min(j + INVERSE_BLOCK, d))
            avg = (a[bi, bj] + a[bj, bi].mT) * 0.5
            a[bi, bj] = avg
            a[bj, bi] = avg.mT


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
    ``W_G Hinv_GG^-1 Hinv_G,:``. With ``L L^T = Hinv_GG``, ``Z = L^-1 Hinv_G,:`` and
    ``V = L^-1 W_G^T``, it is ``V^T Z`` and the downdate is ``Z^T Z``: both are applied in
    place (no full-size temporary), and ``Z^T Z`` is symmetric by construction, so ``hinv``
    stays symmetric without a separate pass. Returns the error ``||V||^2``.
    """
    return _remove(W, hinv, group).pow(2).sum().item()


def remove_group_rows(W: torch.Tensor, hinv: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """:func:`remove_group`, returning the error of each output row (``(out,)``, on ``W``'s
    device, no host sync) instead of their sum. Rows are independent least-squares problems,
    so successive removals add up row by row: after any number of steps, the sum of the
    returned vectors is ``diag((W0 - W) Hd (W0 - W)^T)`` for the damped Hessian ``Hd`` whose
    inverse ``hinv`` started as."""
    return _remove(W, hinv, group).pow(2).sum(0)


def _remove(W: torch.Tensor, hinv: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """The update of :func:`remove_group`; returns ``V = L^-1 W_G^T`` (g, out)."""
    chol = _group_cholesky(hinv[group][:, group])
    z = torch.linalg.solve_triangular(chol, hinv[group, :], upper=False)  # (g, in)
    v = torch.linalg.solve_triangular(chol, W[:, group].T, upper=False)  # (g, out)
    W.addmm_(v.T, z, alpha=-1.0)
    W[:, group] = 0.0
    hinv.addmm_(z.T, z, alpha=-1.0)
    hinv[group, :] = 0.0
    hinv[:, group] = 0.0
    return v


def output_error(W0: torch.Tensor, W1: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W0 - W1) H (W0 - W1)^T) / tr(W0 H W0^T)``: relative output error on the data."""
    delta = W0 - W1
    num = ((delta @ hessian) * delta).sum()
    den = ((W0 @ hessian) * W0).sum().clamp_min(1e-30)
    return float(num / den)


@contextmanager
def _tf32_matmul(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or previous
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def output_errors(W0: torch.Tensor, W1: torch.Tensor, pruned: torch.Tensor,
                  hessian: torch.Tensor) -> tuple[float, float]:
    """Relative output errors (see :func:`output_error`) of zeroing the ``pruned`` columns of
    ``W0`` without compensation, and of replacing ``W0`` by ``W1``.

    The uncompensated error only involves ``H`` on the pruned columns, and the two full products
    share one GEMM; on CUDA they run in TF32, which is plenty for a reported figure (it is
    not used by the pruning decisions) and several times faster than fp32 at FFN widths.
    """
    idx = pruned.nonzero().squeeze(1)
    w_p = W0[:, idx]
    num_nc = ((w_p @ hessian[idx][:, idx]) * w_p).sum()
    stacked = torch.cat([W0, W0 - W1])
    with _tf32_matmul(W0.is_cuda):
        prod = stacked @ hessian
    out = W0.shape[0]
    den = (prod[:out] * W0).sum().clamp_min(1e-30)
    num = (prod[out:] * stacked[out:]).sum()
    return float(num_nc / den), float(num / den)
