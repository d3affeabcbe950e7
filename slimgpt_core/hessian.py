"""Layer-input Hessians ``H = 2 X X^T / n`` accumulated over calibration batches."""

from __future__ import annotations

import torch

from slimgpt_core.errors import NonFiniteHessianError


def check_finite(matrix: torch.Tensor, where: str) -> None:
    """Raise :class:`NonFiniteHessianError` naming ``where`` if ``matrix`` has NaN/Inf."""
    finite = torch.isfinite(matrix)
    if not bool(finite.all()):
        raise NonFiniteHessianError(where, int((~finite).sum()), matrix.numel())


class HessianAccumulator:
    """Sums ``X^T X`` in fp32 over every token that passes through one linear layer.

    Half-precision activations on CUDA are multiplied with fp32 accumulation and fp32 output
    (``torch.mm(..., out_dtype=float32)``) instead of being upcast first: same sum, several
    times faster, and no fp32 copy of the activations. Elsewhere they are upcast.

    ``name`` (e.g. ``"layer 3 self_attn.o_proj"``) is what an error about this Hessian names.
    """

    def __init__(self, dim: int, device: torch.device | str, name: str = "Hessian") -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.tokens = 0
        self.name = name
        self.mixed_precision = True  # until this torch build shows it lacks mm(out_dtype=)
        self._finished: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        if self._finished is not None:
            raise RuntimeError(f"{self.name}: the Hessian was already taken")
        x = x.reshape(-1, x.shape[-1])
        self.tokens += x.shape[0]
        if self.mixed_precision and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            try:
                self.sum.add_(torch.mm(x.T, x, out_dtype=torch.float32))
                return
            except (TypeError, RuntimeError):  # older torch: no out_dtype for mm
                self.mixed_precision = False
        x = x.float()
        self.sum.addmm_(x.T, x)

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n``, scaled in place: at FFN widths a second full-size fp32 matrix is
        gigabytes. The accumulator is finished afterwards (later calls return the same
        matrix; adding more tokens is an error)."""
        if self._finished is not None:
            return self._finished
        if self.tokens == 0:
            raise ValueError(f"{self.name}: no calibration tokens reached this layer")
        # Checked once, where the Hessian is finished: a NaN would otherwise surface much
        # later as an "indefinite" Cholesky failure that invites pointless damping retries.
        check_finite(self.sum, self.name)
        self._finished = self.sum.mul_(2.0 / self.tokens)
        return self._finished
