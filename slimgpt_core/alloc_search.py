"""Per-layer widths refined on the model's own loss (``PruneConfig.allocation = "search"``).

The sensitivity curves (:mod:`slimgpt_core.allocation`) price each layer's removals alone, in
a local, linearised proxy of the loss. This refines their allocation by evolutionary search
(EvoPress-style: Sieberling et al., 2024) on the quantity that matters -- the divergence of
the whole model's next-token distribution from the dense one:

1. **Levels.** On the dense model's activations every layer's o_proj and down_proj are pruned
   greedily, as for the curves, and the compensated weights are kept at every head unit and
   every ``grid`` channels around the curves' allocation (masked: removed inputs have zero
   columns, which is exactly the pruned layer's function).
2. **Stitching.** A candidate allocation is evaluated by swapping those weights into the
   dense model and measuring the mean KL divergence from the dense model's predictions on
   calibration windows (cached).
3. **Search.** Each generation mutates the best allocation so far by moving head units or
   channel packets between layers (totals, and so the parameter count, unchanged), screens the
   offspring on a few windows and scores the best on all fitness windows; the parent is
   replaced only by a better child.
4. **Judging.** The stitched proxy (every layer pruned on dense inputs, none of the sequential
   pass's compensation of earlier layers' changes) and the pruned model part ways as the search
   goes on: on SmolLM2-135M at 50% the proxy's best allocation pruned to 39.7 perplexity on one
   calibration seed of three, against 34.9 for the curves' own. So a few allocations along the
   search's trail, the curves' first, are pruned for real and the one whose pruned model is
   closest to the dense one on calibration text is kept (:func:`rescore`).

The levels are independent (dense inputs), the pruning itself stays sequential: the search
ranks allocations, it does not produce the weights.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from slimgpt_core.allocation import (
    CURVE_TOKENS,
    channel_curve,
    channel_step,
    channel_steps,
    curve_limits,
    dense_layer_hessians,
    head_curve,
    head_units,
    plan_from_counts,
)
from slimgpt_core.families import Family
from slimgpt_core.layer_io import LayerContext
from slimgpt_core.schedule import ModelShape, PlanError, PruningPlan

log = logging.getLogger(__name__)

#: Called after each generation (``"search"``, generation, generations, the best stitched KL)
#: and each judged candidate (``"judge"``, candidates judged, candidates, its pruned KL): a
#: caller reports progress from it, or raises to stop (the dense weights are put back).
StepHook = Callable[[str, int, int, float], None]

#: What the levels may take off a GPU (:func:`level_budget`).
CPU_LEVEL_BYTES = 4 * 2**30


@dataclass(frozen=True)
class SearchSettings:
    generations: int = 100
    offspring: int = 8
    survivors: int = 2
    #: Channels one channel move shifts between layers (a multiple of the allocation's step).
    grid: int = 64
    seed: int = 0
    #: Calibration tokens the fitness is measured on (whole windows, at least one), and per
    #: forward pass; a generation screens its offspring on a quarter of the chunks.
    fitness_tokens: int = 4096
    chunk_tokens: int = 1024
    #: Allocations along the way (the curves' first, the search's last; evenly spaced in
    #: generations) that are pruned for real and judged by the pruned model's KL divergence
    #: on ``rescore_tokens`` of calibration (:func:`rescore`); 0 or 1 = the search's last,
    #: unjudged. Nine, not five: the nine include the five (the pick is never further from
    #: the dense model on calibration text), and the search can pass through far worse models
    #: (SmolLM2-135M, 50%: perplexity 46-55 at generations 12-38 on one seed); on held-out
    #: text nine picked 0.1% better than five over seven runs, within noise (docs/BENCHMARKS.md).
    rescore: int = 9
    rescore_tokens: int = 16384


@dataclass
class LayerLevels:
    """One layer's compensated weights: ``heads[u]`` after ``u`` head units (``heads[0]`` the
    dense weight), ``channels[c]`` after ``c`` channels (on the layer's grid)."""

    heads: list[torch.Tensor]
    channels: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class SearchResult:
    units: list[int]
    steps: list[int]
    start_kl: float
    final_kl: float
    accepted: int
    generations: int = 0
    #: (units, steps) of the allocations to re-score, first to last (distinct).
    trail: list[tuple[list[int], list[int]]] = field(default_factory=list)
    #: The generation each trail entry was the parent at (0: the curves' allocation).
    trail_generations: list[int] = field(default_factory=list)
    #: The pruned models' KL divergence per trail entry, once re-scored; and the one chosen.
    pruned_kl: list[float] = field(default_factory=list)
    chosen: int = 0
    #: Channels per level step the levels were kept at (chosen from the memory budget).
    grid: int = 0

    def summary(self) -> dict[str, float | list[float] | list[int]]:
        out: dict[str, float | list[float] | list[int]] = {
            "start_kl": round(self.start_kl, 6), "final_kl": round(self.final_kl, 6),
            "generations": self.generations, "improved": self.accepted, "grid": self.grid}
        if self.pruned_kl:
            out["pruned_kl"] = [float(f"{v:.6g}") for v in self.pruned_kl]
            out["trail_generations"] = list(self.trail_generations)
            out["chosen"] = self.chosen
        return out


def level_budget(device: torch.device, pending: int = 0) -> int:
    """Bytes the levels may take: a quarter of the GPU's free memory once ``pending`` more
    bytes are there (the pruning itself needs the rest), or :data:`CPU_LEVEL_BYTES`."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(0, free - pending) // 4
    return CPU_LEVEL_BYTES


def level_grid(shape: ModelShape, policy: str, max_ratio: float, grid: int,
               element_size: int, budget: int) -> int:
    """The finest channel grid (``grid`` or a multiple of it, doubling) whose levels fit
    ``budget`` bytes; :class:`PlanError` when not even the coarsest does."""
    step = channel_step(shape)
    grid = max(step, grid // step * step)
    max_units, max_channels = curve_limits(shape, policy, max_ratio)
    o_bytes = shape.hidden_size * shape.num_heads * shape.head_dim * element_size
    d_bytes = shape.hidden_size * shape.intermediate_size * element_size
    while True:
        per_layer = (max_units + 1) * o_bytes + (max_channels // grid + 2) * d_bytes
        need = shape.num_layers * per_layer
        if need <= budget:
            return grid
        if grid >= max_channels:
            raise PlanError(f"allocation 'search' keeps every layer's pruned weights at each "
                            f"level: {need / 2**30:.1f} GiB even at its coarsest, over the "
                            f"{budget / 2**30:.1f} GiB it may use here; use allocation "
                            f"'sensitivity'")
        grid *= 2


def search_grid(shape: ModelShape, policy: str, max_ratio: float, element_size: int,
                vocab: int, fitness_tokens: int, device: torch.device, grid: int,
                pending: int = 0) -> int:
    """The levels' channel grid on ``device`` (:func:`level_grid`), the dense model's
    log-probabilities on ``fitness_tokens`` (kept beside them) off the budget first;
    ``pending``: bytes of the model not on ``device`` yet. :class:`PlanError` when even the
    coarsest grid does not fit -- known before any pass over the model."""
    cache = fitness_tokens * vocab * 4
    return level_grid(shape, policy, max_ratio, grid, element_size,
                      max(0, level_budget(device, pending) - cache))


@torch.no_grad()
def measure_levels(model: nn.Module, acts: torch.Tensor, contexts: list[LayerContext],
                   plan: PruningPlan, policy: str, max_ratio: float, percdamp: float,
                   grid: int, batch_size: int, device: torch.device,
                   family: Family) -> list[LayerLevels]:
    """Every layer's weights at each head unit, and at each ``grid`` channels from the count
    ``plan`` removes there (so the plan itself is one of the candidates)."""
    shape = plan.shape
    max_units, max_channels = curve_limits(shape, policy, max_ratio)
    step = channel_step(shape)
    out = []
    for i, layer, h_attn, h_ffn in dense_layer_hessians(model, acts, contexts, batch_size,
                                                          device, family):
        o_w, d_w = family.o_proj(layer).weight, family.down_proj(layer).weight
        heads = [o_w.detach().clone()]
        head_curve(o_w.detach(), h_attn, torch.zeros(o_w.shape[0], device=device),
                   num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                   head_dim=shape.head_dim, max_units=max_units, policy=policy,
                   percdamp=percdamp, snapshots=heads)
        offset = plan.layers[i].channels_removed % grid
        channels: dict[int, torch.Tensor] = {}
        if offset == 0:
            channels[0] = d_w.detach().clone()
        channel_curve(d_w.detach(), h_ffn, torch.zeros(d_w.shape[0], device=device),
                      max_channels=max_channels, percdamp=percdamp, min_group=step,
                      max_group=step, step=step, snapshots=channels,
                      keep=lambda c, o=offset: c % grid == o)
        dtype = o_w.dtype
        out.append(LayerLevels([w.to(dtype) for w in heads],
                               {c: w.to(dtype) for c, w in channels.items()}))
    return out


class _Stitcher:
    """Swaps the levels' weights into the (dense) model; :meth:`restore` puts the dense
    weights back."""

    def __init__(self, model: nn.Module, family: Family, levels: list[LayerLevels],
                 step: int) -> None:
        layers = family.decoder_layers(model)
        self.o_projs = [family.o_proj(layer) for layer in layers]
        self.down_projs = [family.down_proj(layer) for layer in layers]
        self.dense = [(o.weight.data, d.weight.data) for o, d in zip(self.o_projs,
                                                                      self.down_projs)]
        self.levels = levels
        self.step = step

    def apply(self, units: Sequence[int], steps: Sequence[int]) -> None:
        for o, d, lv, u, s in zip(self.o_projs, self.down_projs, self.levels, units, steps):
            o.weight.data = lv.heads[u]
            d.weight.data = lv.channels[s * self.step]

    def restore(self) -> None:
        for o, d, (wo, wd) in zip(self.o_projs, self.down_projs, self.dense):
            o.weight.data, d.weight.data = wo, wd


class _Fitness:
    """Mean KL divergence of the model's next-token distribution from the dense model's."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor, device: torch.device,
                 batch_size: int) -> None:
        self.model = model
        self.windows = windows.to(device)
        self.batch_size = batch_size
        self.dense = [F.log_softmax(self._logits(self.windows[i:i + batch_size]), -1)
                      for i in range(0, len(self.windows), batch_size)]

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits.float()

    @torch.no_grad()
    def __call__(self, chunks: Sequence[int]) -> float:
        total = torch.zeros((), device=self.windows.device)
        tokens = 0
        for c in chunks:
            ids = self.windows[c * self.batch_size:(c + 1) * self.batch_size]
            logp = F.log_softmax(self._logits(ids), -1)
            dense = self.dense[c]
            total += (dense.exp() * (dense - logp)).sum()
            tokens += ids.numel()
        return float(total) / tokens


def _mutate(units: list[int], steps: list[int], max_units: int,
            allowed: dict[int, list[int]], grid_steps: int,
            rng: random.Random) -> tuple[list[int], list[int]]:
    """Move 1-3 head units or channel packets (of ``grid_steps`` steps, to counts
    ``allowed`` for the layer) from one layer to another."""
    units, steps = list(units), list(steps)
    n = len(units)
    for _ in range(rng.choice((1, 1, 2, 3))):
        i, j = rng.sample(range(n), 2)
        if rng.random() < 0.5:
            if units[i] > 0 and units[j] < max_units:
                units[i] -= 1
                units[j] += 1
        elif steps[i] - grid_steps in allowed[i] and steps[j] + grid_steps in allowed[j]:
            steps[i] -= grid_steps
            steps[j] += grid_steps
    return units, steps


@torch.no_grad()
def search(model: nn.Module, family: Family, levels: list[LayerLevels], plan: PruningPlan,
           policy: str, windows: torch.Tensor, device: torch.device, batch_size: int,
           settings: SearchSettings, on_step: StepHook | None = None) -> SearchResult:
    """Refine ``plan``'s head units and channel steps per layer (same totals) on the
    stitched model's KL divergence from the dense model on ``windows``."""
    step = channel_step(plan.shape)
    grid_steps = settings.grid // step
    units, steps = head_units(plan, policy), channel_steps(plan)
    max_units = min(len(lv.heads) for lv in levels) - 1
    allowed = {i: [c // step for c in lv.channels] for i, lv in enumerate(levels)}
    if len(levels) < 2:
        raise ValueError("the search moves units between layers: it needs two or more")
    rng = random.Random(settings.seed)
    stitcher = _Stitcher(model, family, levels, step)
    try:
        fitness = _Fitness(model, windows, device, batch_size)
        every = list(range(len(fitness.dense)))
        screen = max(1, len(every) // 4)

        def score(u: list[int], s: list[int], chunks: Sequence[int]) -> float:
            stitcher.apply(u, s)
            return fitness(chunks)

        best = start = score(units, steps, every)
        accepted = 0
        marks = ({round(k * settings.generations / (settings.rescore - 1))
                  for k in range(settings.rescore)} if settings.rescore > 1 else set())
        trail = [(units, steps)] if 0 in marks else []
        trail_generations = [0] if trail else []
        for generation in range(1, settings.generations + 1):
            chunks = rng.sample(every, screen)
            kids = [_mutate(units, steps, max_units, allowed, grid_steps, rng)
                    for _ in range(settings.offspring)]
            kids = [k for k in kids if k != (units, steps)]
            if kids:
                ranked = sorted(kids, key=lambda k: score(*k, chunks))[:settings.survivors]
                value, kid = min(((score(*k, every), k) for k in ranked), key=lambda t: t[0])
                if value < best:
                    best, (units, steps) = value, kid
                    accepted += 1
            if generation in marks and trail[-1] != (units, steps):
                trail.append((units, steps))
                trail_generations.append(generation)
            if on_step is not None:
                on_step("search", generation, settings.generations, best)
    finally:
        stitcher.restore()
    return SearchResult(units, steps, start, best, accepted, settings.generations, trail,
                        trail_generations, grid=settings.grid)


def search_plan(model: nn.Module, calibration: torch.Tensor, plan: PruningPlan, policy: str,
                percdamp: float, batch_size: int, device: torch.device, family: Family,
                max_ratio: float, settings: SearchSettings,
                prune: Callable[[PruningPlan], None] | None = None,
                on_step: StepHook | None = None) -> tuple[PruningPlan, SearchResult | None]:
    """``plan`` (the curves' allocation) refined by search; the same parameter count. A
    one-layer model has nothing to move: its plan comes back as it is (and no result).
    ``prune`` prunes the model in place (masked) to a plan: with it the search's trail is
    judged by :func:`rescore`. ``on_step``: see :data:`StepHook`."""
    if plan.shape.num_layers < 2:
        return plan, None
    from slimgpt_core.layer_io import capture_layer_inputs, contexts_to

    t0 = time.perf_counter()
    seqlen = calibration.shape[1]
    layer = family.decoder_layers(model)[0]
    fitness_windows = max(1, settings.fitness_tokens // seqlen)
    vocab = model.get_output_embeddings().weight.shape[0]
    grid = search_grid(plan.shape, policy, max_ratio, next(layer.parameters()).element_size(),
                       vocab, min(fitness_windows, calibration.shape[0]) * seqlen, device,
                       settings.grid)
    # The curves' pass saw the same dense activations, but the levels' channel grid is
    # anchored at the allocation those curves produce, known only after the last layer: keeping
    # every step's weights instead would take ``grid / step`` times the memory.
    acts, contexts = capture_layer_inputs(model, calibration[:max(1, CURVE_TOKENS // seqlen)],
                                          device, batch_size, device)
    levels = measure_levels(model, acts, contexts_to(contexts, device), plan, policy,
                            max_ratio, percdamp, grid, batch_size, device, family)
    del acts
    log.debug("allocation search: levels measured, %.1f s", time.perf_counter() - t0)
    result = search(model, family, levels, plan, policy, calibration[:fitness_windows], device,
                    max(1, settings.chunk_tokens // seqlen), replace(settings, grid=grid),
                    on_step)
    log.info("allocation search: KL %.5f -> %.5f (%d of %d generations improved), %.1f s",
             result.start_kl, result.final_kl, result.accepted, settings.generations,
             time.perf_counter() - t0)
    del levels
    if prune is not None and settings.rescore > 1:
        return rescore(model, calibration, plan, result, policy, device, settings,
                       prune, on_step), result
    return plan_from_counts(plan, result.units, result.steps, policy, "search"), result


@torch.no_grad()
def rescore(model: nn.Module, calibration: torch.Tensor, plan: PruningPlan,
            result: SearchResult, policy: str, device: torch.device, settings: SearchSettings,
            prune: Callable[[PruningPlan], None], on_step: StepHook | None = None
            ) -> PruningPlan:
    """The allocation on the search's trail whose *pruned* model is closest to the dense one
    (mean KL divergence on calibration windows); ``prune`` prunes ``model`` in place, masked,
    to a plan. ``model`` is dense again afterwards; ``result`` records the divergences."""
    plans = [plan_from_counts(plan, u, s, policy, "search") for u, s in result.trail]
    if len(plans) < 2:
        return plan_from_counts(plan, result.units, result.steps, policy, "search")
    seqlen = calibration.shape[1]
    vocab = model.get_output_embeddings().weight.shape[0]
    fit = max(1, min(settings.rescore_tokens // seqlen,
                     level_budget(device) // (seqlen * vocab * 4)))
    fitness = _Fitness(model, calibration[:fit], device,
                       max(1, settings.chunk_tokens // seqlen))
    every = range(len(fitness.dense))
    dense = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    for candidate in plans:
        try:
            prune(candidate)
            result.pruned_kl.append(fitness(every))
        finally:
            model.load_state_dict(dense)
        if on_step is not None:
            on_step("judge", len(result.pruned_kl), len(plans), result.pruned_kl[-1])
    result.chosen = min(range(len(plans)), key=result.pruned_kl.__getitem__)
    log.info("allocation search: pruned models' KL along the trail %s; chose #%d",
             " ".join(f"{v:.5f}" for v in result.pruned_kl), result.chosen)
    return plans[result.chosen]
