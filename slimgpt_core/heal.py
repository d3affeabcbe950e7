"""Recovery after pruning: distil the dense model into the pruned one (optional ``heal``).

The student (pruned) learns to match the teacher's (dense) next-token distribution -- a
token-level KL divergence on the logits, optionally plus the mean squared difference of the
final hidden states -- on calibration windows, for a fixed budget of tokens. Either low-rank
adapters on every projection of the decoder layers (``lora``; merged into the weights at the
end, so the exported model has the pruned shapes and no extra modules) or the decoder
layers' own weights (``full``). Embeddings, the LM head and everything outside the decoder
layers stay frozen (tied embeddings would otherwise change the teacher's vocabulary too).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimgpt_core.layer_io import decoder_layers

HEAL_MODES: tuple[str, ...] = ("lora", "full")


@dataclass
class HealConfig:
    #: Training tokens (windows x sequence length x steps); the budget that bounds the time.
    tokens: int = 1_000_000
    mode: str = "lora"
    rank: int = 16
    #: None: 2e-4 for LoRA, 2e-5 for full weights.
    lr: float | None = None
    batch_size: int = 4
    #: Weight of the final-hidden-state MSE next to the logit KL (0 = logits only).
    hidden_weight: float = 0.0
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in HEAL_MODES:
            raise ValueError(f"unknown heal mode {self.mode!r}; choose one of "
                             f"{', '.join(HEAL_MODES)}")
        if self.tokens < 1 or self.rank < 1 or self.batch_size < 1:
            raise ValueError("heal tokens, rank and batch_size must be >= 1")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.mode == "lora" else 2e-5)


def heal_settings(config: HealConfig, *, windows: int, window_seed: int,
                  seqlen: int) -> dict[str, Any]:
    """What decides a healing run's weights, for the recipe in the model card: the training
    settings and the windows it trained on (``windows`` windows of ``seqlen`` tokens sampled
    from the calibration text with ``window_seed``)."""
    out: dict[str, Any] = {"mode": config.mode, "tokens": config.tokens,
                           "lr": config.learning_rate, "batch_size": config.batch_size,
                           "hidden_weight": config.hidden_weight,
                           "temperature": config.temperature, "seed": config.seed,
                           "windows": windows, "window_seed": window_seed, "seqlen": seqlen}
    if config.mode == "lora":
        out["rank"] = config.rank
    return out


@dataclass
class HealReport:
    steps: int
    tokens: int
    seconds: float
    loss_first: float
    loss_last: float
    mode: str
    losses: list[float] = field(default_factory=list)


class LoRALinear(nn.Module):
    """``base(x) + (x A^T) B^T * scale`` with trainable fp32 ``A`` (rank x in), ``B`` = 0."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.rank = min(rank, base.in_features, base.out_features)
        dev = base.weight.device
        a = torch.randn(self.rank, base.in_features, generator=generator) / math.sqrt(
            base.in_features)
        self.lora_a = nn.Parameter(a.to(dev))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, self.rank, device=dev))
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x.float() @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) + (delta * self.scale).to(x.dtype)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            w = self.base.weight.float() + self.scale * (self.lora_b @ self.lora_a)
            self.base.weight.copy_(w.to(self.base.weight.dtype))
        return self.base


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (p.exp() * (p - s)).sum(-1).mean() * t * t


def heal(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, config: HealConfig,
         device: torch.device | str | None = None,
         progress: Callable[[int, int, float], None] | None = None,
         should_cancel: Callable[[], bool] | None = None) -> HealReport:
    """Distil ``teacher`` into ``student`` in place on ``windows`` (N x seqlen ids)."""
    device = torch.device(device) if device is not None else next(student.parameters()).device
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(student)
    wrapped: list[tuple[nn.Module, str, LoRALinear]] = []
    upcast: list[tuple[nn.Module, torch.dtype]] = []
    if config.mode == "lora":
        for layer in layers:
            # Every projection of the layer, whatever the family calls it (fused ones too).
            paths = [name for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
            for path in paths:
                lora = LoRALinear(_get(layer, path), config.rank, gen)
                _set(layer, path, lora)
                wrapped.append((layer, path, lora))
        params = [p for _, _, lo in wrapped for p in (lo.lora_a, lo.lora_b)]
    else:
        for layer in layers:
            dtype = next(layer.parameters()).dtype
            if dtype != torch.float32:  # optimiser steps need fp32 weights
                layer.float()
                upcast.append((layer, dtype))
        params = [p for layer in layers for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)

    seq = windows.shape[1]
    steps = max(1, config.tokens // (config.batch_size * seq))
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.randperm(windows.shape[0], generator=gen)
    losses: list[float] = []
    student.train(False)  # no dropout: distillation of a deterministic function
    try:
        for step in range(steps):
            if should_cancel is not None and should_cancel():
                break
            start = (step * config.batch_size) % windows.shape[0]
            idx = order[torch.arange(start, start + config.batch_size) % windows.shape[0]]
            ids = windows[idx].to(device)
            with torch.no_grad():
                t_out = teacher(input_ids=ids, use_cache=False,
                                output_hidden_states=config.hidden_weight > 0)
            with torch.enable_grad():
                s_out = student(input_ids=ids, use_cache=False,
                                output_hidden_states=config.hidden_weight > 0)
                loss = _kl(s_out.logits, t_out.logits, config.temperature)
                if config.hidden_weight > 0:
                    th, sh = t_out.hidden_states[-1].float(), s_out.hidden_states[-1].float()
                    loss = loss + config.hidden_weight * (sh - th).pow(2).mean() / th.pow(
                        2).mean().clamp_min(1e-12)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, steps, losses[-1])
    finally:
        for layer, path, lora in wrapped:
            _set(layer, path, lora.merged())
        for layer, dtype in upcast:
            layer.to(dtype)
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), False))
    done = len(losses)
    return HealReport(steps=done, tokens=done * config.batch_size * seq,
                      seconds=time.perf_counter() - t0,
                      loss_first=losses[0] if losses else float("nan"),
                      loss_last=losses[-1] if losses else float("nan"), mode=config.mode,
                      losses=losses)
