"""Per-layer widths from measured sensitivity instead of a fixed log shape
(``PruneConfig.allocation = "sensitivity"``).

1. **Loss weights.** One forward/backward pass of the dense model on calibration windows gives,
   for the residual stream after each attention block and each FFN block, the mean squared
   gradient of the summed next-token loss per hidden dimension ``f`` (the diagonal of the
   empirical Fisher). A small perturbation ``delta`` there costs about ``1/2 sum_j f_j delta_j^2``
   of loss. With ``selection="fisher"`` the pruning's own full output Fisher is measured
   instead (:mod:`slimgpt_core.fisher`), and its diagonal serves here.
2. **Error curves.** On the dense model's own activations (of the first
   :data:`CURVE_TOKENS` tokens), every layer's heads and FFN channels are removed greedily
   (the same OBS steps as the pruning itself) far past the plan, and after each step the
   *loss-weighted* error ``sum_j f_j (dW H dW^T)_jj`` of the compensated weights is recorded:
   what removing ``u`` heads or ``c`` channels of that layer would cost, in loss units. It is
   accumulated from the steps' own row errors (:class:`_WeightedError`), not recomputed.
3. **Allocation.** The number of heads and of channels the base plan removes in total (its log
   shape) is kept, so the parameter count -- and the dry-run estimate's total -- is exact;
   the counts are distributed over layers by taking the cheapest increments first along each
   curve's convex minorant. Heads and channels may also be traded in exactly parameter-equal
   packets (3 query heads = ``2 * head_dim`` channels when nothing has a bias), and the split
   with the least total cost wins. A head unit is what the GQA policy removes: a query head
   (``free``), one per KV group (``balanced``), or a whole KV group with its key/value head
   (``group``, and every policy in a multi-head model, where each head is its own group).

The curves use dense inputs, not the already-pruned ones the pruning will see: they rank
layers, the pruning itself stays sequential.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise

import torch
from torch import nn

from slimgpt_core.channels import group_size
from slimgpt_core.families import Family
from slimgpt_core.fisher import output_fishers
from slimgpt_core.heads import _head_columns
from slimgpt_core.layer_io import LayerContext, contexts_to, micro_batches
from slimgpt_core.obs import damped_inverse, group_errors, remove_group_rows
from slimgpt_core.schedule import (
    CHANNEL_MULTIPLE,
    MAX_LAYER_RATIO,
    ModelShape,
    PlanError,
    PruningPlan,
)


@dataclass(frozen=True)
class LayerCurves:
    """Loss-weighted cost of removing ``u`` heads (``heads[u]``) and ``c`` channels
    (``channels``: (count, cost) points from 0 up, interpolated in between)."""

    heads: list[float]
    channels: list[tuple[int, float]]


# -- 1. loss weights -----------------------------------------------------------------------
def output_sensitivity(model: nn.Module, windows: torch.Tensor, device: torch.device,
                       family: Family,
                       batch_size: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: mean squared loss gradient per hidden dim after attention and after FFN
    (taken at the output projections: what joins the residual stream there)."""
    return output_fishers(model, windows, device, family, full=False, batch_size=batch_size)


# -- 2. error curves -----------------------------------------------------------------------
def _weighted_error(W0: torch.Tensor, W: torch.Tensor, H: torch.Tensor,
                    weight: torch.Tensor) -> float:
    """``sum_j f_j ((W0 - W) H (W0 - W)^T)_jj`` by a full product (the reference; the curves
    accumulate it step by step, :class:`_WeightedError`)."""
    delta = W0 - W
    return float((((delta @ H) * delta).sum(1) * weight.to(delta.device)).sum())


def _diagonal(weight: torch.Tensor) -> torch.Tensor:
    """Per-dimension loss weights; a full output Fisher (``selection="fisher"``) gives its
    diagonal. (Curves run in the full metric ranked layers worse on SmolLM2-135M: 1.87x vs
    1.80x dense perplexity at 50%, mean of three calibration seeds; docs/BENCHMARKS.md.)"""
    return torch.diagonal(weight) if weight.dim() == 2 else weight


class _WeightedError:
    """The loss-weighted error of the compensated weights, accumulated from the OBS steps.

    Every output row is its own least-squares problem, and each greedy step is the exact
    projection (in the metric of the damped Hessian ``Hd = H + damping * I`` that the
    inverse belongs to) onto a smaller subspace, so the rows' errors add up step by step
    (:func:`~slimgpt_core.obs.remove_group_rows`): ``diag(dW Hd dW^T)`` after any number of
    steps is the sum of the steps' row errors. The undamped error the curve reports is that
    minus ``damping * ||dW_j||^2`` (input channels that never fired have a zero column in
    ``dW``), an elementwise pass instead of the ``dW @ H`` product of every step.
    """

    def __init__(self, W0: torch.Tensor, weight: torch.Tensor, damping: float) -> None:
        self.W0 = W0
        self.weight = weight.to(W0.device, torch.float32)
        self.damping = damping
        self.rows = torch.zeros(W0.shape[0], dtype=torch.float32, device=W0.device)

    def step(self, row_errors: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Add one step's row errors; the weighted error so far (a 0-dim tensor, no sync)."""
        self.rows += row_errors
        drift = (self.W0 - W).pow(2).sum(1)
        return ((self.rows - self.damping * drift) * self.weight).sum()


def _curve(values: list[torch.Tensor]) -> list[float]:
    """[0.0] followed by the steps' errors, read back in one transfer."""
    return [0.0] + (torch.stack(values).tolist() if values else [])


def head_curve(W: torch.Tensor, H: torch.Tensor, weight: torch.Tensor, *, num_heads: int,
               num_kv_heads: int, head_dim: int, max_units: int, policy: str,
               percdamp: float, snapshots: list[torch.Tensor] | None = None) -> list[float]:
    """Cost after removing 0..max_units units: single query heads (``free``, never emptying a
    KV group), one query head per KV group (``balanced``) or whole KV groups (``group``, and
    every policy in multi-head attention, as :func:`~slimgpt_core.heads.prune_heads` does:
    a unit is then one head with its key/value head). ``snapshots`` collects the compensated
    weights after each step."""
    from slimgpt_core.heads import prune_heads

    W = W.float()
    group = num_heads // num_kv_heads
    if group == 1:
        policy = "group"
    if policy == "balanced":
        out = [0.0]
        for u in range(1, max_units + 1):
            Wu = W.clone()
            prune_heads(Wu, H, num_heads=num_heads, num_kv_heads=num_kv_heads,
                        head_dim=head_dim, heads_to_remove=u * num_kv_heads, policy="balanced",
                        percdamp=percdamp)
            out.append(_weighted_error(W, Wu, H, weight))
            if snapshots is not None:
                snapshots.append(Wu)
        return out
    inv = damped_inverse(H, percdamp)
    hinv = inv.hinv
    W0 = W.clone()
    W0[:, inv.dead] = 0.0
    Wc = W0.clone()
    error = _WeightedError(W0, weight, inv.damping)
    device = W.device
    if policy == "group":  # a unit is a KV group: the columns of all its query heads
        cols = _head_columns(torch.arange(num_heads, device=device), head_dim)
        cols = cols.view(num_kv_heads, group * head_dim)
        max_units = min(max_units, num_kv_heads - 1)
    else:
        cols = _head_columns(torch.arange(num_heads, device=device), head_dim)
    n_units = cols.shape[0]
    unit_group = torch.arange(n_units, device=device) // (1 if policy == "group" else group)
    per_group_cap = 1 if policy == "group" else group - 1
    alive = torch.ones(n_units, dtype=torch.bool, device=device)
    per_group = torch.zeros(num_kv_heads, dtype=torch.long, device=device)
    steps: list[torch.Tensor] = []
    for _ in range(max_units):
        candidates = (alive & (per_group[unit_group] < per_group_cap)).nonzero().squeeze(1)
        if candidates.numel() == 0:
            break
        best = candidates[int(torch.argmin(group_errors(Wc, hinv, cols[candidates])))]
        steps.append(error.step(remove_group_rows(Wc, hinv, cols[best]), Wc))
        alive[best] = False
        per_group[unit_group[best]] += 1
        if snapshots is not None:
            snapshots.append(Wc.clone())
    return _curve(steps)


def channel_curve(W: torch.Tensor, H: torch.Tensor, weight: torch.Tensor, *, max_channels: int,
                  percdamp: float, min_group: int, max_group: int, step: int | None = None,
                  snapshots: dict[int, torch.Tensor] | None = None,
                  keep: Callable[[int], bool] | None = None) -> list[tuple[int, float]]:
    """Cost after each greedy group, removing up to ``max_channels`` channels (groups of
    ``step`` channels when given). ``snapshots`` collects the compensated weights after the
    steps whose count of removed channels ``keep`` accepts."""
    inv = damped_inverse(H, percdamp)
    hinv = inv.hinv
    W0 = W.float().clone()
    W0[:, inv.dead] = 0.0
    Wc = W0.clone()
    error = _WeightedError(W0, weight, inv.damping)
    alive = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    counts: list[int] = []
    steps: list[torch.Tensor] = []
    removed = 0
    while removed < max_channels:
        # Finer steps than the pruning's own rule: the curve needs resolution everywhere.
        g = min(max_channels - removed, step or max(
            min_group, group_size(max_channels - removed, min_group, max_group) // 4))
        scores = (Wc.pow(2).sum(0) / torch.diagonal(hinv)).masked_fill(~alive, float("inf"))
        chosen = torch.argsort(scores, stable=True)[:g]
        steps.append(error.step(remove_group_rows(Wc, hinv, chosen), Wc))
        alive[chosen] = False
        removed += g
        counts.append(removed)
        if snapshots is not None and (keep is None or keep(removed)):
            snapshots[removed] = Wc.clone()
    return list(zip([0, *counts], _curve(steps)))


def curve_limits(shape: ModelShape, policy: str, max_ratio: float) -> tuple[int, int]:
    """(head units, channels) the curves go up to in every layer."""
    gs, kv = shape.group_size, shape.num_kv_heads
    if gs == 1 or policy == "group":
        max_units = kv - 1
    elif policy == "balanced":
        max_units = gs - 1
    else:
        max_units = shape.num_heads - kv
    max_channels = min(math.floor(shape.intermediate_size * MAX_LAYER_RATIO),
                       math.ceil(shape.intermediate_size * max_ratio))
    return max_units, max_channels


def dense_layer_hessians(model: nn.Module, acts: torch.Tensor, contexts: list[LayerContext],
                         batch_size: int, device: torch.device, family: Family
                         ) -> Iterator[tuple[int, nn.Module, torch.Tensor, torch.Tensor]]:
    """Per layer, on the dense model's own activations (``acts`` is advanced through the
    dense layers and consumed): the layer (on ``device`` until the next step) and the
    Hessians of its o_proj's and down_proj's inputs."""
    from slimgpt_core.hessian import HessianAccumulator

    for i, layer in enumerate(family.decoder_layers(model)):
        home = next(layer.parameters()).device
        layer.to(device)
        o_proj, down_proj = family.o_proj(layer), family.down_proj(layer)
        h_attn = HessianAccumulator(o_proj.in_features, device, f"layer {i} self_attn.o_proj")
        h_ffn = HessianAccumulator(down_proj.in_features, device, f"layer {i} mlp.down_proj")
        hook = o_proj.register_forward_pre_hook(lambda _m, a, acc=h_attn: acc.add(a[0]))
        try:
            for sl in micro_batches(acts.shape[0], batch_size):
                h = family.attention_block(layer, acts[sl].to(device), contexts[i])
                h_ffn.add(family.ffn_hidden(layer, h))
                acts[sl] = family.ffn_block(layer, h).to(acts.device)
        finally:
            hook.remove()
        yield i, layer, h_attn.hessian(), h_ffn.hessian()
        layer.to(home)


@torch.no_grad()
def measure_curves(model: nn.Module, acts: torch.Tensor, contexts: list[LayerContext],
                   sensitivity: list[tuple[torch.Tensor, torch.Tensor]], shape: ModelShape,
                   policy: str, max_ratio: float, percdamp: float, min_group: int,
                   max_group: int, batch_size: int, device: torch.device,
                   family: Family) -> list[LayerCurves]:
    """Curves of every layer on the dense model's activations (``acts`` is advanced through
    the dense layers and consumed)."""
    max_units, max_channels = curve_limits(shape, policy, max_ratio)
    curves = []
    for i, layer, h_attn, h_ffn in dense_layer_hessians(model, acts, contexts, batch_size,
                                                          device, family):
        w_attn, w_ffn = _diagonal(sensitivity[i][0]), _diagonal(sensitivity[i][1])
        heads = head_curve(family.o_proj(layer).weight.detach(), h_attn, w_attn,
                           num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                           head_dim=shape.head_dim, max_units=max_units, policy=policy,
                           percdamp=percdamp)
        channels = channel_curve(family.down_proj(layer).weight.detach(), h_ffn, w_ffn,
                                 max_channels=max_channels, percdamp=percdamp,
                                 min_group=min_group, max_group=max_group)
        curves.append(LayerCurves(heads, channels))
    return curves


# -- 3. allocation (plain arithmetic) --------------------------------------------------------
def _interpolate(points: Sequence[tuple[int, float]], count: int) -> float:
    for (c0, e0), (c1, e1) in pairwise(points):
        if c0 <= count <= c1:
            return e0 + (e1 - e0) * (count - c0) / max(1, c1 - c0)
    return math.inf


def _hull(costs: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of (i, costs[i]), from 0 to the last finite point."""
    pts = [i for i, c in enumerate(costs) if math.isfinite(c)]
    hull: list[int] = []
    for i in pts:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (costs[b] - costs[a]) * (i - a) >= (costs[i] - costs[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _distribute(costs: list[list[float]], total: int) -> tuple[list[int], float] | None:
    """Counts per layer (indices into each cost list) summing to ``total`` with least cost,
    taking the cheapest increments along each list's convex minorant."""
    capacity = sum(len(c) - 1 for c in costs)
    if total > capacity:
        return None
    segments = []  # (slope, layer, from, to)
    for layer, c in enumerate(costs):
        hull = _hull(c)
        for a, b in pairwise(hull):
            segments.append(((c[b] - c[a]) / (b - a), layer, a, b))
    segments.sort()
    counts = [0] * len(costs)
    left = total
    for _slope, layer, a, b in segments:
        if left <= 0:
            break
        take = min(b - a, left)
        counts[layer] = a + take
        left -= take
    if left > 0:
        return None
    return counts, sum(c[n] for c, n in zip(costs, counts))


def _head_unit(shape: ModelShape, policy: str) -> tuple[int, int]:
    """(query heads, KV heads) one head unit of ``policy`` removes."""
    if shape.group_size == 1 or policy == "group":
        return shape.group_size, 1
    return (shape.num_kv_heads if policy == "balanced" else 1), 0


def allocate(base: PruningPlan, curves: Sequence[LayerCurves], policy: str) -> PruningPlan:
    """Redistribute ``base``'s removed heads and channels over layers by the curves.

    Head units are what :func:`~slimgpt_core.heads.prune_heads` removes under ``policy``:
    one query head (``free``), one per KV group (``balanced``), or a whole KV group with its
    key/value head (``group``, and any policy in multi-head attention).
    """
    shape = base.shape
    if policy not in ("free", "balanced", "group"):
        raise PlanError(f"unknown gqa_policy {policy!r} for sensitivity allocation")
    unit, kv_unit = _head_unit(shape, policy)
    if not kv_unit and any(lp.kv_heads_removed for lp in base.layers):
        raise PlanError("sensitivity allocation with gqa_policy 'free' keeps every KV head "
                        "of a grouped-query model; lower the ratio")
    mult = channel_step(shape)
    total_units = sum(lp.heads_removed for lp in base.layers) // unit
    total_steps = sum(lp.channels_removed for lp in base.layers) // mult
    head_costs = [list(c.heads) for c in curves]
    max_steps = [c.channels[-1][0] // mult for c in curves]
    chan_costs = [[_interpolate(c.channels, k * mult) for k in range(m + 1)]
                  for c, m in zip(curves, max_steps)]
    # Exact trades: `th` head units weigh as much as `tc` channel steps.
    p_unit = unit * shape.params_per_q_head + kv_unit * shape.params_per_kv_head
    p_step = mult * shape.params_per_channel
    g = math.gcd(p_unit, p_step)
    th, tc = p_step // g, p_unit // g
    best: tuple[float, list[int], list[int]] | None = None
    # Every feasible split (k packets moved from channels to heads), not a window around the
    # base one: at 50% the cheapest split can lie far from the schedule's.
    trades = (range(-(total_units // th), total_steps // tc + 1) if th <= 16
              else range(1))  # no small parameter-equal packet (biases): keep the base split
    for k in trades:
        hu, cs = total_units + k * th, total_steps - k * tc
        heads = _distribute(head_costs, hu)
        chans = _distribute(chan_costs, cs)
        if heads is None or chans is None:
            continue
        cost = heads[1] + chans[1]
        if best is None or cost < best[0]:
            best = (cost, heads[0], chans[0])
    if best is None:
        raise PlanError("sensitivity allocation found no feasible split; lower the ratio")
    _, units, steps = best
    return plan_from_counts(base, units, steps, policy)


def plan_from_counts(base: PruningPlan, units: Sequence[int], steps: Sequence[int],
                     policy: str, schedule: str = "sensitivity") -> PruningPlan:
    """``base`` with ``units[i]`` head units and ``steps[i]`` channel steps removed from
    layer ``i``; the totals must weigh what ``base``'s do."""
    shape = base.shape
    unit, kv_unit = _head_unit(shape, policy)
    mult = channel_step(shape)
    layers = []
    for lp, u, s in zip(base.layers, units, steps):
        heads_removed, kv_removed, channels_removed = u * unit, u * kv_unit, s * mult
        kept_h = shape.num_heads - heads_removed
        kept_kv = shape.num_kv_heads - kv_removed
        kept_c = shape.intermediate_size - channels_removed
        after = shape.layer_params(kept_h, kept_kv, kept_c)
        layers.append(replace(lp, ratio=1 - (after - shape.layer_fixed_params)
                              / (lp.params_before - shape.layer_fixed_params),
                              heads_removed=heads_removed, kv_heads_removed=kv_removed,
                              channels_removed=channels_removed, heads_kept=kept_h,
                              kv_heads_kept=kept_kv, channels_kept=kept_c,
                              params_after=after))
    plan = PruningPlan(shape, base.target_ratio, schedule, base.gqa_policy,
                       tuple(lp.ratio for lp in layers), tuple(layers), layers[0].ratio,
                       layers[-1].ratio, base.notes)
    if plan.decoder_params_after != base.decoder_params_after:
        raise AssertionError("allocation changed the parameter count")  # a bug, not input
    return plan


def head_units(plan: PruningPlan, policy: str) -> list[int]:
    """Head units removed per layer of ``plan`` (what :func:`plan_from_counts` takes)."""
    unit, _ = _head_unit(plan.shape, policy)
    return [lp.heads_removed // unit for lp in plan.layers]


def channel_steps(plan: PruningPlan) -> list[int]:
    """Channel steps removed per layer of ``plan``."""
    return [lp.channels_removed // channel_step(plan.shape) for lp in plan.layers]


def channel_step(shape: ModelShape) -> int:
    """Channels per step of the allocation."""
    return CHANNEL_MULTIPLE if shape.intermediate_size % CHANNEL_MULTIPLE == 0 else 1


#: Calibration windows of the forward/backward pass that gives the loss weights.
SENSITIVITY_WINDOWS = 16
#: Calibration tokens whose dense activations give the curves' Hessians (whole windows, at
#: least one). The curves only rank layers against each other, so a fixed amount of text
#: does, however much the pruning itself is given: 32 windows of 2048 tokens (an 8B model's
#: allocation 26.6 s on an H200, was 89.7 s on all 128), every window of the 64 x 512
#: protocol of issue 15 (where fewer windows were measurably worse at 20%).
CURVE_TOKENS = 65_536


def curve_max_ratio(base: PruningPlan) -> float:
    """How far past ``base``'s widest layer ratio the curves are measured."""
    return min(MAX_LAYER_RATIO, 2 * max(lp.ratio for lp in base.layers) + 0.05)


def sensitivity_plan(model: nn.Module, calibration: torch.Tensor, base: PruningPlan,
                     policy: str, percdamp: float, min_group: int, max_group: int,
                     batch_size: int, device: torch.device, family: Family,
                     sensitivity_windows: int = SENSITIVITY_WINDOWS,
                     curve_windows: int | None = None,
                     fishers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                     ) -> PruningPlan:
    """Measure and allocate: ``base``'s totals over the layers by loss-weighted curves.

    The loss weights come from ``fishers`` when given (full or diagonal, see
    :mod:`slimgpt_core.fisher`), else from the first ``sensitivity_windows`` calibration
    windows; the curves from the first ``curve_windows`` (None: :data:`CURVE_TOKENS`' worth).
    """
    from slimgpt_core.layer_io import capture_layer_inputs

    sens = fishers if fishers is not None else output_sensitivity(
        model, calibration[:sensitivity_windows], device, family)
    if curve_windows is None:
        curve_windows = max(1, CURVE_TOKENS // calibration.shape[1])
    acts, contexts = capture_layer_inputs(model, calibration[:curve_windows], device,
                                          batch_size, device)
    curves = measure_curves(model, acts, contexts_to(contexts, device), sens, base.shape,
                            policy, curve_max_ratio(base), percdamp, min_group, max_group, batch_size,
                            device, family)
    return allocate(base, curves, policy)
