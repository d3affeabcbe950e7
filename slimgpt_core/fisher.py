"""The loss's own metric on each layer's outputs (``PruneConfig.selection = "fisher"``).

OBS scores a group of columns by the error it leaves in the projection's output,
``tr(dW H dW^T)``, as if every output dimension mattered equally to the model. They do not:
the residual stream has directions the next-token loss barely reads and directions it reads
closely. With ``g`` the gradient of the loss with respect to the projection's output (one row
per token) and ``F = E[g g^T]`` (the empirical Fisher of that output), a small change ``dW``
costs about ``1/2 tr(F dW H dW^T)`` of loss: the Kronecker-factored (K-FAC) curvature of
``W``, with OBS's ``H`` as the input factor and ``F`` as the output factor.

In that metric the compensation of a removed group is *the same* as in OBS's (the constraint
fixes whole columns, and the rows' optimal updates do not depend on ``F``): only which group
is removed changes. With ``F = L L^T`` (Cholesky), ``tr(F dW H dW^T) = tr((L^T dW) H (L^T
dW)^T)``, so pruning ``L^T W`` with the unchanged OBS code and mapping back by ``L^-T`` gives
exactly the Fisher-scored greedy pass, compensation included.

``F`` is measured once, on the dense model, by one forward/backward pass over calibration
windows; it needs the whole model on one device (as sensitivity allocation does, which reads
its diagonal).

Which labels the gradients are taken for: the calibration text's own next tokens give the
*empirical* Fisher. Labels drawn from the dense model's own predictions give the *true*
Fisher, whose expectation is the Gauss-Newton matrix of the cross-entropy, ``J^T (diag(p) -
p p^T) J`` -- the curvature the second-order cost above actually needs; the empirical one
only approximates it, and worst where the model is unsure. ``label_samples`` draws per
token estimate it (one backward pass each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimgpt_core.families import Family
from slimgpt_core.layer_io import micro_batches

#: Damping of ``F`` as a share of its mean diagonal: directions no calibration token's loss
#: read keep a little weight instead of none (held-out text reads them).
FISHER_DAMPING = 0.01


@dataclass(frozen=True)
class OutputMetric:
    """``root`` (``L^T``) and ``inverse`` (``L^-T``) of the damped output Fisher."""

    root: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def from_fisher(cls, fisher: torch.Tensor, damping: float = FISHER_DAMPING) -> OutputMetric:
        F = fisher.double()
        F = F + damping * torch.diagonal(F).mean().clamp_min(1e-30) * torch.eye(
            F.shape[0], dtype=F.dtype, device=F.device)
        lower = torch.linalg.cholesky(F)
        eye = torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
        inverse = torch.linalg.solve_triangular(lower.mT, eye, upper=True)
        return cls(lower.mT.float().contiguous(), inverse.float().contiguous())

    def to_metric_space(self, W: torch.Tensor) -> torch.Tensor:
        return self.root.to(W.device) @ W

    def from_metric_space(self, W: torch.Tensor) -> torch.Tensor:
        return self.inverse.to(W.device) @ W


def output_fishers(model: nn.Module, windows: torch.Tensor, device: torch.device,
                   family: Family, *, full: bool, batch_size: int = 2,
                   label_samples: int = 0,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, the per-token Fisher of the summed next-token loss at the outputs
    of ``o_proj`` and of ``down_proj`` (what each branch adds to the residual stream):
    ``E[g g^T]`` (``full``) or its diagonal ``E[g^2]``. ``label_samples`` = 0 takes the loss
    on the text's next tokens (empirical Fisher); N > 0 averages N losses on labels drawn
    from the model's predictions (true Fisher; draws seeded by ``seed``)."""
    layers = family.decoder_layers(model)
    sums: list[list[torch.Tensor | None]] = [[None, None] for _ in layers]
    tokens = 0

    def grab(i: int, slot: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _gin: object, gout: tuple[torch.Tensor, ...]) -> None:
            g = gout[0].detach().float().reshape(-1, gout[0].shape[-1])
            acc = g.T @ g if full else g.pow(2).sum(0)
            prev = sums[i][slot]
            sums[i][slot] = acc if prev is None else prev + acc
        return hook

    if label_samples < 0:
        raise ValueError("label_samples must be >= 0 (0: the text's own next tokens)")
    draws = torch.Generator(device=device).manual_seed(seed) if label_samples else None
    handles = []
    for i, layer in enumerate(layers):
        handles.append(family.o_proj(layer).register_full_backward_hook(grab(i, 0)))
        handles.append(family.down_proj(layer).register_full_backward_hook(grab(i, 1)))
    # Gradients must flow from the first layer on, with no parameter needing one.
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for sl in micro_batches(windows.shape[0], batch_size):
                ids = windows[sl].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
                if not label_samples:
                    nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1),
                                                reduction="sum").backward()
                    tokens += ids.numel()
                    continue
                probs = torch.softmax(flat.detach(), dim=-1)
                for k in range(label_samples):
                    labels = torch.multinomial(probs, 1, generator=draws).squeeze(1)
                    nn.functional.cross_entropy(flat, labels, reduction="sum").backward(
                        retain_graph=k + 1 < label_samples)
                    tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    out = []
    for attn, ffn in sums:
        if attn is None or ffn is None:
            raise RuntimeError("no gradient reached a decoder layer's output projections")
        out.append((attn / tokens, ffn / tokens))
    return out
