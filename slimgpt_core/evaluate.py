"""Perplexity of a causal LM on token windows."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               device: str | torch.device | None = None) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all windows."""
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
