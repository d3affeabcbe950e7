"""SlimGPT on a mixture-of-experts FFN (Mixtral, Qwen3-MoE): one Hessian and one OBS pass per
expert, the router untouched.

Expert ``e``'s ``down_proj`` only ever sees the tokens the router sends to it, so its Hessian is
``H_e = 2 X_e^T X_e / n_e`` over those ``n_e`` tokens (``X_e``: the expert's own ``act(gate) *
up`` features; routing weights are left out, as the router's output is not what the
compensation reconstructs). Every expert then loses the layer's planned number of channels with
dynamic-group OBS on its own Hessian (:func:`slimgpt_core.channels.prune_channels`), each its
own channels, all the same number (the fused 3-D expert weights hold one width per layer).

Few-token policy. ``H_e`` has rank at most ``n_e``, so an expert that sees fewer tokens than it
has channels gets a singular Hessian: OBS then rests on the damping, its scores drift towards
plain magnitude and its compensation fits a handful of tokens. Below ``min_tokens`` (default:
the expert's width ``F``, the fewest tokens a full-rank ``H_e`` needs) the expert's Hessian is
shrunk towards its *pooled* Hessian, the same expert's features on every calibration token of
the layer, routed there or not::

    s   = 1 - n_e / min_tokens        (0 when n_e >= min_tokens, always 1 when n_e == 0)
    H_e = (1 - s) * H_routed + s * H_pooled        (both normalised per token)

Why this pooled matrix: channels of different experts are different functions, so a Hessian
pooled *across* experts means nothing in expert ``e``'s channel space; the expert's own
features over the layer's whole token pool are full rank (a layer sees ``k`` times more tokens
than an expert on average) and come from the distribution the router draws from. The blend
keeps whatever routed evidence there is, in proportion to how much of it there is, and an
expert no calibration token reached is pruned on the pooled Hessian alone rather than by
magnitude. The extra forward runs only for the experts under the threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimgpt_core.channels import ChannelPruning, prune_channels
from slimgpt_core.collective import Collective
from slimgpt_core.hessian import HessianAccumulator
from slimgpt_core.modeling_slimgpt import set_expert_weights
from slimgpt_core.obs import output_errors


def pooled_share(tokens: int, min_tokens: int) -> float:
    """Weight of the pooled Hessian in an expert's Hessian (the few-token policy above)."""
    if tokens == 0:
        return 1.0  # nothing routed: the pooled Hessian is all there is
    if tokens >= min_tokens:
        return 0.0
    return 1.0 - tokens / min_tokens


@dataclass
class ExpertHessians:
    """Per-expert Hessians of one MoE layer's ``down_proj`` inputs."""

    routed: list[HessianAccumulator]
    pooled: dict[int, HessianAccumulator] = field(default_factory=dict)
    min_tokens: int = 0

    @property
    def tokens(self) -> list[int]:
        return [acc.tokens for acc in self.routed]

    def shares(self) -> list[float]:
        return [pooled_share(n, self.min_tokens) for n in self.tokens]

    def hessian(self, expert: int) -> torch.Tensor:
        """Expert ``expert``'s Hessian under the few-token policy (finishes its accumulators)."""
        share = pooled_share(self.routed[expert].tokens, self.min_tokens)
        if share == 0.0:
            return self.routed[expert].hessian()
        pooled = self.pooled[expert].hessian()
        if share == 1.0:
            return pooled
        return self.routed[expert].hessian().mul_(1.0 - share).add_(pooled, alpha=share)


@torch.no_grad()
def collect_expert_hessians(family: Any, layer: nn.Module,
                            ffn_inputs: Callable[[bool], Iterator[torch.Tensor]],
                            device: torch.device, comm: Collective, min_tokens: int | None,
                            name: str) -> ExpertHessians:
    """Route every token of ``ffn_inputs(True)`` (the FFN inputs, micro-batch by
    micro-batch) with the layer's own router and accumulate each expert's Hessian from the
    tokens sent to it; then, for the experts under the token threshold, a second pass
    (``ffn_inputs(False)``) over all tokens for their pooled Hessians. Sums are reduced over
    ranks; the token counts (and so the policy's decisions) are known on every rank."""
    num_experts, width = family.num_layer_experts(layer), family.ffn_width(layer)
    routed = [HessianAccumulator(width, device, name=f"{name} expert {e} down_proj")
              for e in range(num_experts)]
    for x in ffn_inputs(True):
        x = x.reshape(-1, x.shape[-1])
        index, _weights = family.route(layer, x)
        for e in torch.unique(index).tolist():
            rows = (index == e).any(dim=-1)  # a token counts once per expert it reaches
            routed[e].add(family.expert_hidden(layer, x[rows], e))
    for acc in routed:
        comm.reduce_sum_(acc.sum)
        acc.tokens = comm.reduce_count(acc.tokens)
    hess = ExpertHessians(routed, min_tokens=width if min_tokens is None else int(min_tokens))
    few = [e for e, share in enumerate(hess.shares()) if share > 0.0]
    if few:
        hess.pooled = {e: HessianAccumulator(width, device, name=f"{name} expert {e} pooled")
                       for e in few}
        for x in ffn_inputs(False):
            x = x.reshape(-1, x.shape[-1])
            for e in few:
                hess.pooled[e].add(family.expert_hidden(layer, x, e))
        for acc in hess.pooled.values():
            comm.reduce_sum_(acc.sum)
            acc.tokens = comm.reduce_count(acc.tokens)
    if not comm.is_leader:
        for acc in [*routed, *hess.pooled.values()]:
            del acc.sum
    return hess


@dataclass
class ExpertPruning:
    """What pruning one MoE layer's experts did, expert by expert."""

    kept: list[list[int]]
    tokens: list[int]
    pooled_share: list[float]
    errors: list[float]
    errors_uncompensated: list[float]
    channels: list[ChannelPruning]

    def _mean(self, values: list[float]) -> float:
        # Token-weighted: the error per routed token of the layer (all experts equal when no
        # token was routed anywhere, which only an empty calibration set can do).
        total = sum(self.tokens)
        if total == 0:
            return sum(values) / len(values)
        return sum(v * n for v, n in zip(values, self.tokens)) / total

    @property
    def error(self) -> float:
        return self._mean(self.errors)

    @property
    def error_uncompensated(self) -> float:
        return self._mean(self.errors_uncompensated)

    def summary(self) -> ChannelPruning:
        """The layer's figures in the dense FFN's shape: expert 0's kept channels (every
        expert keeps as many), the mean error, the worst damping."""
        worst = max(self.channels, key=lambda c: (c.retries, c.percdamp))
        return ChannelPruning(
            kept_channels=list(self.kept[0]), error=self.error, damping=worst.damping,
            retries=worst.retries, group_sizes=list(self.channels[0].group_sizes),
            percdamp=worst.percdamp, swaps=sum(c.swaps for c in self.channels))


@torch.no_grad()
def prune_experts(
    family: Any,
    layer: nn.Module,
    hessians: ExpertHessians,
    *,
    channels_to_remove: int,
    percdamp: float,
    min_group: int,
    max_group: int,
    swaps: int,
    compact: bool,
    comm: Collective,
    device: torch.device,
    select: Callable[[torch.Tensor], torch.Tensor],
    finish: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> ExpertPruning:
    """Remove ``channels_to_remove`` channels from every expert of ``layer`` on its own
    Hessian, compensate its ``down_proj``, then slice the fused weights (``compact``) or zero
    the removed columns. ``select(H)`` is the Hessian the selection uses and ``finish(W0, W,
    pruned)`` the weights kept (the pruner's ablation methods)."""
    experts = family.experts(layer)
    num_experts, hidden, width = experts.down_proj.shape
    down = torch.empty((num_experts, hidden, width), dtype=torch.float32, device=device)
    info: Any = None
    if comm.is_leader:
        kept, errs, errs_nc, results = [], [], [], []
        for e in range(num_experts):
            H = hessians.hessian(e)
            W0 = experts.down_proj[e].detach().to(device, torch.float32)
            W = W0.clone()
            channels = prune_channels(W, select(H), channels_to_remove=channels_to_remove,
                                      percdamp=percdamp, min_group=min_group,
                                      max_group=max_group, swaps=swaps)
            removed = torch.ones(width, dtype=torch.bool, device=device)
            removed[channels.kept_channels] = False
            W = finish(W0, W, removed)
            nc, err = output_errors(W0, W, removed, H)
            down[e] = W
            kept.append(channels.kept_channels)
            errs.append(err)
            errs_nc.append(nc)
            results.append(channels)
            del H, W0, W
        info = ExpertPruning(kept, hessians.tokens, hessians.shares(), errs, errs_nc, results)
    info = comm.broadcast_object(info)
    down = comm.broadcast_(down.contiguous())
    if compact:
        compact_experts(experts, info.kept, down)
    else:
        experts.down_proj.data.copy_(down.to(experts.down_proj.device, experts.down_proj.dtype))
    return info


def compact_experts(experts: nn.Module, kept: list[list[int]], down: torch.Tensor) -> None:
    """Slice every expert to its own ``kept`` channels: rows of its ``[gate | up]`` sections of
    ``gate_up_proj`` and columns of ``down`` (``[E, D, F]``, the compensated weights)."""
    gate_up = experts.gate_up_proj
    _experts, two_f, hidden = gate_up.shape
    idx = torch.tensor(kept, dtype=torch.long, device=gate_up.device)  # [E, F']
    rows = torch.cat([idx, two_f // 2 + idx], dim=1)
    new_gate_up = torch.gather(gate_up.detach(), 1, rows[:, :, None].expand(-1, -1, hidden))
    cols = idx.to(down.device)[:, None, :].expand(-1, down.shape[1], -1)
    new_down = torch.gather(down, 2, cols).to(experts.down_proj.device, experts.down_proj.dtype)
    set_expert_weights(experts, new_gate_up.contiguous(), new_down.contiguous())
