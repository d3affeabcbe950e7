"""Per-layer pruning ratios and the parameter arithmetic behind them.

Torch-free on purpose: the API's dry run (`POST /v1/estimate`) imports this module, and the API
image carries no torch. The pruner uses the very same plan, so an estimate is what a job does.

Units that can be removed from one decoder layer:
  * a query head: its `head_dim` rows of q_proj and columns of o_proj (plus its bias and, in
    OLMo-2, its share of the whole-projection q_norm);
  * a key/value head: its rows of k_proj and v_proj (only when no query head uses it any more);
  * an FFN channel: one row of gate_proj and up_proj and one column of down_proj; in a mixture
    of experts (``num_experts`` > 0) one such channel in *each* expert, since the fused expert
    weights give every expert of a layer the same width (the router is never touched).
Hidden size, norms, embeddings and lm_head are never touched. What differs between model
families (biases, norms per layer, per-head norms) comes from the family adapter
(:mod:`slimgpt_core.families`, torch-free) as plain numbers on :class:`ModelShape`.

Schedules follow SlimGPT's Incremental Pruning Ratio (arXiv 2412.18110, sec. 3.3):
``r_i = r_0 + (r_last - r_0) * ln(i + 1) / ln(n)`` with ``r_0 = alpha * r_last``; ``r_last`` is
solved so that the decoder-layer parameter count after rounding to whole heads meets the target.
Within a layer, heads are removed at ``r_i`` (rounded to the GQA policy's unit) and FFN channels
absorb the rounding, so every layer sheds ``r_i`` of its parameters unless an explicit FFN ratio
is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

GQAPolicy = Literal["balanced", "group", "free"]
ScheduleName = Literal["log", "linear", "uniform"]
GQA_POLICIES: tuple[str, ...] = ("balanced", "group", "free")
SCHEDULES: tuple[str, ...] = ("log", "linear", "uniform")


def default_gqa_policy(plain_heads: bool = False) -> str:
    """The GQA policy when none is given -- the one place that decides it (the pruner, the
    dry-run estimate, the CLI, the API and the model card all ask here, so an estimate made
    without a policy has the size the job will have). ``free``: the better model at equal size
    (docs/BENCHMARKS.md, issue 15), but uneven head groups, which only the ``hetero`` artifact
    describes; ``balanced`` with ``plain_heads`` (the ``uniform`` profile's plain config)."""
    return "balanced" if plain_heads else "free"

#: No layer may lose more than this share of its heads or channels: a layer pruned to nothing
#: turns into a residual pass-through that OBS cannot compensate for.
MAX_LAYER_RATIO = 0.95
#: The schedule solver's accepted distance from the target, as a share of decoder parameters.
TARGET_TOLERANCE = 0.01
#: Kept FFN widths are rounded to a multiple of this (when the dense width is one): GEMMs whose
#: inner dimension is not a multiple of 8 fall off the tensor-core fast path. Measured on an
#: H200, an FFN forward at width 9403 took 5x as long as at 9240 (docs/BENCHMARKS.md), and the
#: pruned model pays the same price at inference. Mixture-of-experts widths are always rounded.
CHANNEL_MULTIPLE = 8



def supported_model_types() -> tuple[str, ...]:
    """The model types with a family adapter (see :mod:`slimgpt_core.families`)."""
    from slimgpt_core.families import supported_model_types as registered

    return registered()

#: Largest accepted value of each dimension. Far above any released model (the deepest have
#: ~130 layers; hidden sizes reach ~25k, vocabularies ~260k), yet small enough that a plan is
#: cheap to compute: the dry run answers an HTTP request, and its cost grows with the layers.
DIMENSION_LIMITS: dict[str, int] = {
    "num_layers": 512,
    "hidden_size": 1 << 20,
    "num_heads": 1 << 14,
    "num_kv_heads": 1 << 14,
    "head_dim": 1 << 16,
    "intermediate_size": 1 << 22,
    "vocab_size": 1 << 24,
}
#: Largest accepted number of routed experts per layer (released models have up to 256).
MAX_EXPERTS = 1 << 12
#: The schedule solver stops bisecting once r_last is known to this precision: plans whose
#: r_last differ by less remove the same units in every layer but in freak cases.
SOLVER_PRECISION = 1e-10


class PlanError(ValueError):
    """A pruning plan cannot be made for this model and these settings."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder that pruning arithmetic needs.

    ``layer_norms``: hidden-size norms per layer (2 for Llama, 4 for Gemma 2/3);
    ``head_norm``: ``per_head`` q/k norms of ``head_dim`` (fixed), ``projection`` q/k norms
    over the whole projection (removed with the heads), or ``none``;
    ``heads_divide_hidden``: the stock config needs ``hidden_size % heads == 0``;
    ``num_experts``: routed experts per layer (0: a dense FFN), each ``intermediate_size``
    channels wide, behind a bias-free ``[num_experts, hidden_size]`` router.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    layer_norms: int = 2
    head_norm: str = "none"
    heads_divide_hidden: bool = False
    num_experts: int = 0

    def __post_init__(self) -> None:
        if (isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int)
                or not 0 <= self.num_experts <= MAX_EXPERTS):
            raise PlanError(f"model config: the number of experts must be an integer in "
                            f"[0, {MAX_EXPERTS}], got {self.num_experts!r}")
        for name, limit in DIMENSION_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PlanError(f"model config: {name} must be an integer, got {value!r}")
            if value <= 0:
                raise PlanError(f"model config: {name} must be positive, got {value}")
            if value > limit:
                raise PlanError(f"model config: {name} is {value}, more than the {limit} supported")
        if self.num_heads % self.num_kv_heads:
            raise PlanError(
                f"model config: {self.num_heads} attention heads are not a multiple of "
                f"{self.num_kv_heads} key/value heads"
            )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Build from a Hugging Face ``config.json`` dict through its family adapter."""
        from slimgpt_core.families import UnsupportedFamilyError, family_for_config

        if "model_type" not in config:
            config = {**config, "model_type": "llama"}  # a bare config is read as Llama's
        try:
            family = family_for_config(config)
        except UnsupportedFamilyError as err:
            raise PlanError(str(err)) from None
        try:
            shape = cls(**family.shape_fields(config))
        except KeyError as missing:
            raise PlanError(f"model config lacks {missing.args[0]!r}") from None
        except (TypeError, ValueError, ArithmeticError) as bad:
            # ArithmeticError: a zero head count (division), or 1e400 read as infinity.
            if isinstance(bad, PlanError):
                raise
            raise PlanError(f"model config has a malformed field: {bad}") from None
        return shape

    # -- parameter arithmetic -------------------------------------------------------------
    @property
    def params_per_q_head(self) -> int:
        norm = self.head_dim if self.head_norm == "projection" else 0
        return 2 * self.hidden_size * self.head_dim + (self.head_dim if self.qkv_bias else 0) + norm

    @property
    def params_per_kv_head(self) -> int:
        norm = self.head_dim if self.head_norm == "projection" else 0
        return (2 * self.hidden_size * self.head_dim + (2 * self.head_dim if self.qkv_bias else 0)
                + norm)

    @property
    def params_per_channel(self) -> int:
        return (3 * self.hidden_size + (2 if self.mlp_bias else 0)) * max(1, self.num_experts)

    @property
    def layer_fixed_params(self) -> int:
        """Parameters of a layer that pruning never removes: its norms (hidden-size ones and
        shared per-head q/k norms), the o_proj/down_proj biases and the MoE router."""
        return (self.layer_norms * self.hidden_size
                + self.num_experts * self.hidden_size
                + (2 * self.head_dim if self.head_norm == "per_head" else 0)
                + (self.hidden_size if self.o_bias else 0)
                + (self.hidden_size if self.mlp_bias else 0))

    def layer_params(self, heads: int, kv_heads: int, channels: int) -> int:
        return (
            self.layer_fixed_params
            + heads * self.params_per_q_head
            + kv_heads * self.params_per_kv_head
            + channels * self.params_per_channel
        )

    @property
    def dense_layer_params(self) -> int:
        return self.layer_params(self.num_heads, self.num_kv_heads, self.intermediate_size)

    @property
    def non_layer_params(self) -> int:
        """Embeddings, final norm and (unless tied) lm_head."""
        emb = self.vocab_size * self.hidden_size
        return emb + self.hidden_size + (0 if self.tie_word_embeddings else emb)


@dataclass(frozen=True)
class LayerPlan:
    index: int
    ratio: float
    heads_removed: int
    kv_heads_removed: int
    channels_removed: int
    heads_kept: int
    kv_heads_kept: int
    channels_kept: int
    params_before: int
    params_after: int


@dataclass(frozen=True)
class PruningPlan:
    shape: ModelShape
    target_ratio: float
    schedule: str
    gqa_policy: str
    layer_ratios: tuple[float, ...]
    layers: tuple[LayerPlan, ...]
    r_first: float
    r_last: float
    notes: tuple[str, ...] = field(default=())

    @property
    def decoder_params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def decoder_params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.decoder_params_after / self.decoder_params_before

    @property
    def total_params_before(self) -> int:
        return self.decoder_params_before + self.shape.non_layer_params

    @property
    def total_params_after(self) -> int:
        return self.decoder_params_after + self.shape.non_layer_params

    @property
    def is_uniform(self) -> bool:
        """Every layer keeps the same widths, so a plain Llama config can describe the result."""
        widths = {(lp.heads_kept, lp.kv_heads_kept, lp.channels_kept) for lp in self.layers}
        return len(widths) == 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_ratio": self.target_ratio,
            "achieved_ratio": round(self.achieved_ratio, 6),
            "schedule": self.schedule,
            "gqa_policy": self.gqa_policy,
            "r_first": round(self.r_first, 6),
            "r_last": round(self.r_last, 6),
            "decoder_params_before": self.decoder_params_before,
            "decoder_params_after": self.decoder_params_after,
            "total_params_before": self.total_params_before,
            "total_params_after": self.total_params_after,
            "uniform_widths": self.is_uniform,
            "shape": asdict(self.shape),
            "layers": [asdict(layer) for layer in self.layers],
            "notes": list(self.notes),
        }


def schedule_ratios(
    schedule: str, n: int, r_last: float, alpha: float = 0.25
) -> list[float]:
    """Per-layer ratios of a named schedule with last-layer ratio ``r_last``."""
    r_first = alpha * r_last
    if schedule == "uniform":
        return [r_last] * n
    if n == 1:
        return [r_last]
    if schedule == "log":
        return [r_first + (r_last - r_first) * math.log(i + 1) / math.log(n) for i in range(n)]
    if schedule == "linear":
        return [r_first + (r_last - r_first) * i / (n - 1) for i in range(n)]
    raise PlanError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def kv_groups_emptied(num_heads: int, num_kv_heads: int, heads_removed: int) -> int:
    """KV groups that GQA policy ``free`` empties when ``heads_removed`` query heads go: only
    as many as that count forces, so the pruner and the plan agree on the size."""
    return max(0, heads_removed - (num_heads - num_kv_heads))


def plan_layer(
    shape: ModelShape,
    index: int,
    ratio: float,
    gqa_policy: str,
    head_ratio: float | None = None,
    ffn_ratio: float | None = None,
    plain_heads: bool = False,
) -> LayerPlan:
    """How many heads, KV heads and channels layer ``index`` loses at layer ratio ``ratio``.

    ``plain_heads`` keeps only head counts that divide ``hidden_size`` in families whose stock
    config refuses others (transformers 5.x: Llama, Gemma 2/3), so the ``uniform`` artifact
    profile needs it; the FFN then absorbs what the attention does not remove.
    """
    ratio = min(max(ratio, 0.0), MAX_LAYER_RATIO)
    r_heads = ratio if head_ratio is None else head_ratio
    r_heads = min(max(r_heads, 0.0), MAX_LAYER_RATIO)
    gs, kv = shape.group_size, shape.num_kv_heads
    if gqa_policy not in GQA_POLICIES:
        raise PlanError(f"unknown gqa_policy {gqa_policy!r}; choose one of {', '.join(GQA_POLICIES)}")
    if gs == 1:
        # Multi-head attention: every head is its own KV group, so all policies coincide.
        gqa_policy = "group"
    if gqa_policy == "group":
        units = min(round(r_heads * kv), kv - 1)
    elif gqa_policy == "balanced":
        units = min(round(r_heads * gs), gs - 1)
    else:  # free: KV heads go only when so many query heads go that a group must empty
        units = min(round(r_heads * shape.num_heads), shape.num_heads - 1)

    def removed(u: int) -> tuple[int, int]:
        if gqa_policy == "group":
            return u * gs, u
        if gqa_policy == "balanced":
            return u * kv, 0
        return u, kv_groups_emptied(shape.num_heads, kv, u)

    while (plain_heads and shape.heads_divide_hidden and units > 0
           and shape.hidden_size % (shape.num_heads - removed(units)[0])):
        units -= 1
    heads_removed, kv_removed = removed(units)
    before = shape.dense_layer_params
    attn_removed = heads_removed * shape.params_per_q_head + kv_removed * shape.params_per_kv_head
    max_channels = math.floor(shape.intermediate_size * MAX_LAYER_RATIO)
    if ffn_ratio is not None:
        channels = round(min(max(ffn_ratio, 0.0), MAX_LAYER_RATIO) * shape.intermediate_size)
    else:
        wanted = ratio * (before - shape.layer_fixed_params) - attn_removed
        channels = round(wanted / shape.params_per_channel)
    channels = min(max(channels, 0), max_channels)
    # Experts always keep multiples of 8: transformers' default experts kernel (grouped_mm)
    # refuses weights whose rows are not a multiple of 16 bytes (8 bf16 values) apart.
    multiple = (CHANNEL_MULTIPLE if shape.intermediate_size % CHANNEL_MULTIPLE == 0
                or shape.num_experts else 1)
    kept = round((shape.intermediate_size - channels) / multiple) * multiple
    min_kept = -(-(shape.intermediate_size - max_channels) // multiple) * multiple
    channels = shape.intermediate_size - max(kept, min_kept)
    heads_kept = shape.num_heads - heads_removed
    kv_kept = kv - kv_removed
    channels_kept = shape.intermediate_size - channels
    return LayerPlan(
        index=index,
        ratio=ratio,
        heads_removed=heads_removed,
        kv_heads_removed=kv_removed,
        channels_removed=channels,
        heads_kept=heads_kept,
        kv_heads_kept=kv_kept,
        channels_kept=channels_kept,
        params_before=before,
        params_after=shape.layer_params(heads_kept, kv_kept, channels_kept),
    )


def _plan_from_ratios(
    shape: ModelShape,
    ratios: Sequence[float],
    gqa_policy: str,
    head_ratio: float | None,
    ffn_ratio: float | None,
    plain_heads: bool = False,
) -> tuple[LayerPlan, ...]:
    return tuple(
        plan_layer(shape, i, r, gqa_policy, head_ratio, ffn_ratio, plain_heads)
        for i, r in enumerate(ratios)
    )


def _removed_share(layers: Sequence[LayerPlan]) -> float:
    before = sum(lp.params_before for lp in layers)
    return 1.0 - sum(lp.params_after for lp in layers) / before


def make_plan(
    shape: ModelShape,
    target_ratio: float,
    schedule: str | Sequence[float] = "log",
    gqa_policy: str | None = None,
    alpha: float = 0.25,
    head_ratio: float | None = None,
    ffn_ratio: float | None = None,
    plain_heads: bool = False,
) -> PruningPlan:
    """Solve the schedule for ``target_ratio`` of decoder-layer parameters and plan every layer.

    ``schedule`` is a name from :data:`SCHEDULES` or an explicit list of per-layer ratios (used
    as given, the target then only being reported against). ``gqa_policy`` None:
    :func:`default_gqa_policy`.
    """
    if gqa_policy is None:
        gqa_policy = default_gqa_policy(plain_heads)
    if not 0.0 < target_ratio < 1.0:
        raise PlanError(f"target ratio must be in (0, 1), got {target_ratio}")
    if not 0.0 <= alpha <= 1.0:
        raise PlanError(f"alpha must be in [0, 1], got {alpha}")
    if gqa_policy not in GQA_POLICIES:
        raise PlanError(f"unknown gqa_policy {gqa_policy!r}; choose one of {', '.join(GQA_POLICIES)}")
    n = shape.num_layers
    notes: list[str] = []

    if not isinstance(schedule, str):
        ratios = [float(r) for r in schedule]
        if len(ratios) != n:
            raise PlanError(f"explicit schedule has {len(ratios)} ratios for {n} layers")
        if any(not 0.0 <= r <= MAX_LAYER_RATIO for r in ratios):
            raise PlanError(f"explicit per-layer ratios must lie in [0, {MAX_LAYER_RATIO}]")
        layers = _plan_from_ratios(shape, ratios, gqa_policy, head_ratio, ffn_ratio, plain_heads)
        return PruningPlan(shape, target_ratio, "explicit", gqa_policy, tuple(ratios), layers,
                           ratios[0], ratios[-1], tuple(notes))

    def layers_for(r_last: float) -> tuple[list[float], tuple[LayerPlan, ...]]:
        rs = schedule_ratios(schedule, n, r_last, alpha)
        return rs, _plan_from_ratios(shape, rs, gqa_policy, head_ratio, ffn_ratio, plain_heads)

    # The removed share is non-decreasing in r_last (each layer's counts are), so bisect for
    # the crossing, then take whichever side of the rounding step lands closer to the target.
    lo, hi = 0.0, 1.0
    if _removed_share(layers_for(hi)[1]) < target_ratio:
        raise PlanError(
            f"target ratio {target_ratio} is out of reach with the {schedule!r} schedule "
            f"(at most {_removed_share(layers_for(hi)[1]):.3f} for this model); lower it or use "
            "a flatter schedule"
        )
    while hi - lo > SOLVER_PRECISION:
        mid = (lo + hi) / 2
        if _removed_share(layers_for(mid)[1]) < target_ratio:
            lo = mid
        else:
            hi = mid
    candidates = [layers_for(lo) + (lo,), layers_for(hi) + (hi,)]
    ratios, layers, r_last = min(candidates, key=lambda c: abs(_removed_share(c[1]) - target_ratio))
    achieved = _removed_share(layers)
    if abs(achieved - target_ratio) > TARGET_TOLERANCE:
        notes.append(
            f"achieved {achieved:.4f} is more than {TARGET_TOLERANCE} away from the target "
            f"{target_ratio}: heads are removed in units too coarse for this model"
        )
    return PruningPlan(shape, target_ratio, schedule, gqa_policy, tuple(ratios), layers,
                       ratios[0], r_last, tuple(notes))


def estimate(
    config: Mapping[str, Any],
    target_ratio: float,
    schedule: str | Sequence[float] = "log",
    gqa_policy: str | None = None,
    alpha: float = 0.25,
    head_ratio: float | None = None,
    ffn_ratio: float | None = None,
    plain_heads: bool = False,
) -> dict[str, Any]:
    """Dry run for the API: the per-layer widths and parameter counts a job would produce."""
    shape = ModelShape.from_config(config)
    plan = make_plan(shape, target_ratio, schedule, gqa_policy, alpha, head_ratio, ffn_ratio,
                     plain_heads)
    return plan.to_dict()
