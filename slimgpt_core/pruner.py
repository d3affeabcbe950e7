"""SlimGPT, layer by layer: the driver that ties Hessians, OBS and compaction together.

For each decoder layer ``i`` (inputs produced by the already-pruned layers ``0..i-1``):
  1. run the attention block, collecting ``H`` of ``o_proj``'s input; prune heads (batched
     greedy OBS) and compensate ``o_proj``; slice q/k/v/o;
  2. run the pruned attention block (keeping its output ``h``), collecting ``H`` of
     ``down_proj``'s input; prune FFN channels (dynamic groups) and compensate ``down_proj``;
  3. run the pruned FFN block on ``h``: the inputs of layer ``i + 1``.
Only the current layer (and the next one, arriving) and the activations sit on the compute
device. Where the layers live and how they move is :mod:`slimgpt_core.layer_store`'s job
(resident on the device, in host memory, or streamed from the checkpoint's shards); how
several GPUs share one job is :mod:`slimgpt_core.collective`'s.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimgpt_core.availability import unavailable
from slimgpt_core.channels import prune_channels
from slimgpt_core.checkpoint import LayerCheckpoints, tensor_digest
from slimgpt_core.collective import Collective
from slimgpt_core.compact import compact_attention, compact_mlp
from slimgpt_core.errors import SettingUnavailableError
from slimgpt_core.experts import ExpertPruning, collect_expert_hessians, prune_experts
from slimgpt_core.families import Family, family_for_config
from slimgpt_core.fisher import OutputMetric, output_fishers
from slimgpt_core.heads import prune_heads
from slimgpt_core.hessian import CrossAccumulator, HessianAccumulator
from slimgpt_core.layer_io import (
    LayerContext,
    capture_layer_inputs,
    contexts_to,
    layers_prefix,
    micro_batches,
)
from slimgpt_core.layer_store import LayerSource, LayerStore
from slimgpt_core.modeling_slimgpt import resize_layer
from slimgpt_core.obs import damped_inverse, output_errors
from slimgpt_core.schedule import (
    LayerPlan,
    ModelShape,
    PlanError,
    PruningPlan,
    default_gqa_policy,
    make_plan,
)

METHODS: tuple[str, ...] = ("slimgpt", "no_compensation", "magnitude")
#: What the compensation reconstructs. ``layer`` (the paper): each projection's own output on
#: the inputs the already-pruned layers produce. ``dense``: the *dense model's* residual stream
#: after the block, so the kept columns also absorb the drift that earlier layers' pruning left
#: behind (least squares onto ``h_dense - x_pruned``; needs a second activation buffer and one
#: more dense layer forward per layer).
TARGETS: tuple[str, ...] = ("layer", "dense")
#: How per-layer widths are chosen: ``schedule`` (the named or explicit schedule, as planned),
#: ``sensitivity`` (the schedule's totals redistributed by measured loss-weighted error
#: curves, :mod:`slimgpt_core.allocation`; same parameter count) or ``search`` (that
#: allocation refined by evolutionary search on the whole model's divergence from the dense
#: one, :mod:`slimgpt_core.alloc_search`; same parameter count).
ALLOCATIONS: tuple[str, ...] = ("schedule", "sensitivity", "search")
#: How heads and channel groups are scored: ``output`` (the paper: the error each removal
#: leaves in the projection's output) or ``fisher`` (that error in the loss's metric, the
#: dense model's output-side Fisher; same compensation, :mod:`slimgpt_core.fisher`).
SELECTIONS: tuple[str, ...] = ("output", "fisher")
#: Settings added after checkpoints existed: they join the fingerprint only when not at these
#: defaults, so older checkpoints still resume.
_LATER_SETTINGS: dict[str, Any] = {"target": "layer", "local_search": 0,
                                   "allocation": "schedule", "expert_min_tokens": None,
                                   "selection": "output", "fisher_windows": None,
                                   "fisher_samples": 0, "search_generations": 100}


def _selection_hessian(H: torch.Tensor, method: str) -> torch.Tensor:
    # OBS with H = I scores a column group by its squared weight norm and compensates nothing:
    # exactly magnitude pruning, through the same code path.
    return torch.eye(H.shape[0], dtype=H.dtype, device=H.device) if method == "magnitude" else H


def _apply_method(W0: torch.Tensor, W: torch.Tensor, pruned: torch.Tensor,
                  method: str) -> torch.Tensor:
    return W0.masked_fill(pruned[None, :], 0.0) if method == "no_compensation" else W


@dataclass
class PruneConfig:
    target_ratio: float = 0.2
    schedule: str | Sequence[float] = "log"
    alpha: float = 0.25
    #: None: :func:`slimgpt_core.schedule.default_gqa_policy` (``free``, or ``balanced`` with
    #: ``plain_heads``: a plain config needs equal head groups).
    gqa_policy: str | None = None
    head_ratio: float | None = None
    ffn_ratio: float | None = None
    percdamp: float = 0.01
    min_group: int = 64
    max_group: int = 1024
    #: Windows per layer forward; only affects speed and memory, not the result's math.
    batch_size: int = 8
    device: str | None = None
    #: Keep calibration activations in CPU memory instead of on the device.
    offload_activations: bool = False
    #: Move the whole model to a CUDA device before pruning (no per-layer transfers): True,
    #: False (one layer at a time, for models larger than the GPU), or None = when the model
    #: takes less than half of the free device memory. Measured on 7B/H200: 26 s vs 38 s.
    resident: bool | None = None
    #: Bring the next layer to the device while the current one is pruned (and write the
    #: previous one back), on a side CUDA stream. Off only to measure what overlap buys.
    prefetch: bool = True
    #: False keeps full-size layers with zeroed columns (the "masked" model; for testing).
    compact: bool = True
    checkpoint_dir: str | Path | None = None
    seed: int = 0
    #: "slimgpt" (OBS selection and compensation); the ablations "no_compensation" (same
    #: selection, pruned columns only zeroed) and "magnitude" (weight-norm selection, H = I).
    method: str = "slimgpt"
    #: Only head counts that divide hidden_size (what the `uniform` export profile needs).
    plain_heads: bool = False
    #: Prune only the first N layers (the rest stay dense): partial runs for benchmarks.
    stop_after: int | None = None
    #: See :data:`TARGETS`.
    target: str = "layer"
    #: After the greedy pass, up to this many improving swaps of a removed and a kept unit per
    #: projection (heads on o_proj, channels on down_proj); 0 = greedy only (the paper).
    local_search: int = 0
    #: See :data:`ALLOCATIONS`.
    allocation: str = "schedule"
    #: Mixture of experts: an expert routed fewer calibration tokens than this has its Hessian
    #: blended with its pooled one (:mod:`slimgpt_core.experts`); None = the expert's width.
    expert_min_tokens: int | None = None
    #: See :data:`SELECTIONS`.
    selection: str = "output"
    #: Calibration windows the output Fisher is measured on (``selection="fisher"``; it also
    #: weights the sensitivity curves then); None = all of them.
    fisher_windows: int | None = None
    #: Labels of the output Fisher: 0 = the calibration text's next tokens (empirical Fisher);
    #: N = N draws per token from the dense model's own predictions (true Fisher, the loss's
    #: Gauss-Newton curvature; N backward passes). ``selection="fisher"`` only.
    fisher_samples: int = 0
    #: ``allocation="search"``: generations of the evolutionary search.
    search_generations: int = 100

    def __post_init__(self) -> None:
        if self.gqa_policy is None:
            self.gqa_policy = default_gqa_policy(self.plain_heads)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of "
                             f"{', '.join(ALLOCATIONS)}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose one of "
                             f"{', '.join(SELECTIONS)}")
        if self.fisher_windows is not None and self.fisher_windows < 1:
            raise ValueError("fisher_windows must be >= 1 (None: every calibration window)")
        if self.fisher_samples < 0:
            raise ValueError("fisher_samples must be >= 0 (0: the text's own next tokens)")
        if self.fisher_samples and self.selection != "fisher":
            raise ValueError("fisher_samples sets the labels of selection 'fisher'; it needs "
                             "selection='fisher'")
        if self.search_generations < 0:
            raise ValueError("search_generations must be >= 0")
        if self.local_search < 0:
            raise ValueError("local_search (swaps per projection) must be >= 0")
        if self.batch_size < 1 or self.min_group < 1 or self.max_group < self.min_group:
            raise ValueError("batch_size and min_group must be >= 1 and max_group >= min_group")
        if self.percdamp <= 0:
            raise ValueError("percdamp must be positive")
        if self.expert_min_tokens is not None and self.expert_min_tokens < 0:
            raise ValueError("expert_min_tokens must be >= 0 (0: never blend)")

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change the result (not device, batch size or paths)."""
        keys = ("target_ratio", "schedule", "alpha", "gqa_policy", "head_ratio", "ffn_ratio",
                "percdamp", "min_group", "max_group", "compact", "seed", "method",
                "plain_heads")
        out = {k: getattr(self, k) for k in keys}
        out.update({k: getattr(self, k) for k, default in _LATER_SETTINGS.items()
                    if getattr(self, k) != default})
        if not isinstance(out["schedule"], str):
            out["schedule"] = list(out["schedule"])
        return out


@dataclass
class ProgressEvent:
    phase: str  # fisher | allocation | calibrating | attention | ffn | layer_done | resumed
    layer: int | None
    num_layers: int
    message: str
    elapsed_s: float
    metrics: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]
#: ``on_layer(index, tensors, report=...)``: a pruned layer's host tensors and its report.
LayerSink = Callable[..., None]


class PruningCancelled(Exception):
    """Raised between layers when the cancel check says so; finished layers are checkpointed."""

    def __init__(self, layers_done: int) -> None:
        super().__init__(f"pruning cancelled after {layers_done} layers")
        self.layers_done = layers_done


@dataclass
class LayerReport:
    index: int
    ratio: float
    heads_kept: list[int]
    kv_heads_kept: list[int]
    kv_index: list[int]
    channels_kept: list[int]
    attn_error_uncompensated: float
    attn_error: float
    ffn_error_uncompensated: float
    ffn_error: float
    attn_damping: float
    ffn_damping: float
    damping_retries: int
    ffn_group_sizes: list[int]
    seconds: dict[str, float]
    #: Cholesky retries (each 10x more damping) and the damping finally used, as a share of
    #: mean(diag H), per projection. Defaults keep reports of older checkpoints readable.
    attn_damping_retries: int = 0
    ffn_damping_retries: int = 0
    attn_percdamp: float = 0.0
    ffn_percdamp: float = 0.0
    attn_swaps: int = 0  # improving swaps of the local search (PruneConfig.local_search)
    ffn_swaps: int = 0
    #: Mixture of experts only (None otherwise). ``channels_kept`` is then expert 0's list
    #: (every expert of a layer keeps as many); per expert: its kept channels, the calibration
    #: tokens routed to it, and the pooled Hessian's share in its Hessian (few-token policy).
    expert_channels_kept: list[list[int]] | None = None
    expert_tokens: list[int] | None = None
    expert_pooled_share: list[float] | None = None

    def damping_raised(self) -> list[dict[str, Any]]:
        """One entry per projection whose damping had to be raised to invert its Hessian."""
        out = []
        for module, retries, used in (("self_attn.o_proj", self.attn_damping_retries,
                                       self.attn_percdamp),
                                      ("mlp.down_proj", self.ffn_damping_retries,
                                       self.ffn_percdamp)):
            if retries:
                out.append({"layer": self.index, "module": module, "retries": retries,
                            "percdamp_used": used})
        return out


@dataclass
class Probe:
    """Token windows that ride along the pruning pass (the leader only): ``dense`` ones go
    through every layer before it is pruned, the others after. Their final hidden states
    give perplexities before/after, or reference outputs, without a second pass over a
    model that may not fit anywhere."""

    input_ids: torch.Tensor
    dense: bool = False


@dataclass
class PruneResult:
    model: nn.Module
    plan: PruningPlan
    layers: list[LayerReport]
    params_before: int
    params_after: int
    seconds: dict[str, float]
    resumed_from: int = 0
    #: "resident", "host" or "stream": where the layers lived while being pruned.
    placement: str = "resident"
    #: Stream placement: per layer, the safetensors file holding the pruned layer (full keys).
    layer_files: list[Path] = field(default_factory=list)
    #: Final hidden states (before the final norm) of each probe, on the CPU.
    probe_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Bytes moved host -> device and back, and GPU peak memory when measured.
    transfer: dict[str, float] = field(default_factory=dict)
    #: The settings that shaped the result (:meth:`PruneConfig.fingerprint` and the later ones).
    settings: dict[str, Any] = field(default_factory=dict)
    #: ``allocation="search"``: the stitched model's KL from the dense one at the curves'
    #: allocation and at the one found, the generations that improved it, and the pruned
    #: models' KL along the search's trail with the index of the one kept
    #: (:meth:`slimgpt_core.alloc_search.SearchResult.summary`).
    allocation_search: dict[str, Any] | None = None

    def damping_raised(self) -> list[dict[str, Any]]:
        """Every projection whose Hessian needed more damping than asked (empty when none):
        there OBS leaned towards magnitude pruning, worth knowing when judging the result."""
        return [entry for r in self.layers for entry in r.damping_raised()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "layers": [asdict(r) for r in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "seconds": self.seconds,
            "resumed_from": self.resumed_from,
            "placement": self.placement,
            "damping_raised": self.damping_raised(),
            "settings": self.settings,
            **({"allocation_search": self.allocation_search} if self.allocation_search else {}),
        }


def model_shape(model: nn.Module) -> ModelShape:
    return ModelShape.from_config(model.config.to_dict())


def model_family(model: nn.Module) -> Family:
    """The family adapter of ``model`` (raises for a model type without one)."""
    return family_for_config(model.config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def choose_placement(model: nn.Module, device: torch.device, resident: bool | None,
                     streamed: bool) -> str:
    """``stream`` for a skeleton model, else ``resident`` when the model is (or will be
    moved) on the device, else ``host``."""
    if streamed:
        return "stream"
    devices = {p.device for p in model.parameters()}
    if devices == {device} or device.type != "cuda":
        return "resident"
    if resident is False:
        return "host"
    if resident:
        return "resident"
    free, _total = torch.cuda.mem_get_info(device)
    return "resident" if _model_bytes(model) < free / 2 else "host"


def _resolve_device(name: str | None) -> torch.device:
    if name:
        device = torch.device(name)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.totals: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds


def _sync(device: torch.device) -> None:
    # Only the compute stream: copies running on the side stream must not be waited for.
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class _Phase:
    """Times a block into both the layer's and the run's per-phase totals."""

    def __init__(self, clock: _Clock, layer_seconds: dict[str, float], name: str,
                 device: torch.device) -> None:
        self.clock, self.layer_seconds, self.name, self.device = clock, layer_seconds, name, device

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        dt = time.perf_counter() - self.t0
        self.layer_seconds[self.name] = self.layer_seconds.get(self.name, 0.0) + dt
        self.clock.add(self.name, dt)


@dataclass
class _ProbeState:
    acts: torch.Tensor
    contexts: list[LayerContext]
    dense: bool


@torch.no_grad()
def _layer_forward(layer: nn.Module, acts: torch.Tensor, ctx: LayerContext, batch_size: int,
                   device: torch.device, family: Family) -> None:
    """``acts <- layer(acts)`` in place, micro-batch by micro-batch."""
    for sl in micro_batches(acts.shape[0], batch_size):
        h = family.attention_block(layer, acts[sl].to(device), ctx)
        acts[sl] = family.ffn_block(layer, h).to(acts.device)


def _cross(acc: CrossAccumulator | None, comm: Collective) -> torch.Tensor | None:
    """The targets' cross-covariance over every rank's windows, on the leader."""
    if acc is None:
        return None
    comm.reduce_sum_(acc.sum)
    acc.tokens = comm.reduce_count(acc.tokens)
    return acc.cross() if comm.is_leader else None


def _branch_target(out: torch.Tensor, x: torch.Tensor, linear: nn.Module,
                   scale: float) -> torch.Tensor:
    """What ``linear``'s output must be so that ``x + scale * (linear(a))`` equals ``out``."""
    target = out - x
    if scale != 1.0:
        target = target / scale
    bias = getattr(linear, "bias", None)
    return target if bias is None else target - bias


def _least_squares_start(W: torch.Tensor, cross: torch.Tensor, hessian: torch.Tensor,
                         percdamp: float) -> torch.Tensor:
    """``W + (C - W H) (H + damping)^-1``: the weights that best map the inputs onto the
    targets, the damping pulling the *change* towards zero (no drift: ``W`` itself). Pruning
    then starts from them: the least-squares residual splits into this fit's error plus the
    usual OBS error of removing columns from it."""
    inv = damped_inverse(hessian, percdamp)
    out = W + (cross - W @ hessian) @ inv.hinv
    out[:, inv.dead] = 0.0
    return out


def check_settings(model: nn.Module, config: PruneConfig, *, streamed: bool = False,
                   world_size: int = 1) -> None:
    """Raise :class:`SettingUnavailableError` when ``config`` cannot run on ``model`` here
    (:func:`slimgpt_core.availability.unavailable`), with the placement :func:`prune_model`
    would choose: callers check before any expensive work, the pruner checks again."""
    device = _resolve_device(config.device)
    placement = choose_placement(model, device, config.resident, streamed)
    _refuse_unavailable(model_family(model), config, placement, world_size)
    if config.allocation == "search":
        search_fit(model, config, device)


def _refuse_unavailable(family: Family, config: PruneConfig, placement: str,
                        world_size: int) -> None:
    settings = {k: getattr(config, k) for k in ("target", "allocation", "selection")}
    why = unavailable(settings, family, placement=placement, world_size=world_size)
    if why is not None:
        raise SettingUnavailableError(why)


def search_fit(model: nn.Module, config: PruneConfig, device: torch.device) -> int:
    """The channel grid allocation ``search``'s levels would take on ``device`` (sized from
    the shape alone, so known before the Fisher and the curves); refused with
    :class:`SettingUnavailableError` naming ``quality`` (``sensitivity``) when they cannot fit."""
    from slimgpt_core.alloc_search import SearchSettings, search_grid
    from slimgpt_core.allocation import curve_max_ratio

    plan = _config_plan(model_shape(model), config)
    layer = model_family(model).decoder_layers(model)[0]
    pending = sum(p.numel() * p.element_size() for p in model.parameters()
                  if p.device.type != device.type)
    settings = SearchSettings()
    try:
        return search_grid(plan.shape, config.gqa_policy, curve_max_ratio(plan),
                           next(layer.parameters()).element_size(),
                           model.get_output_embeddings().weight.shape[0],
                           settings.fitness_tokens, device, settings.grid, pending)
    except PlanError as exc:
        raise SettingUnavailableError(str(exc), fallback="quality") from exc


def _config_plan(shape: ModelShape, config: PruneConfig) -> PruningPlan:
    """The plan ``config``'s schedule makes for ``shape`` (before any allocation)."""
    return make_plan(shape, config.target_ratio, config.schedule, config.gqa_policy,
                     config.alpha, config.head_ratio, config.ffn_ratio, config.plain_heads)


def _hessian(acc: HessianAccumulator, comm: Collective) -> torch.Tensor | None:
    """The layer's Hessian over every rank's windows, on the leader (None elsewhere)."""
    comm.reduce_sum_(acc.sum)
    acc.tokens = comm.reduce_count(acc.tokens)
    if not comm.is_leader:
        del acc.sum
        return None
    H = acc.hessian()
    del acc.sum  # the caller owns the only reference to the matrix
    acc._finished = None
    return H


@torch.no_grad()
def check_kv_heads(lp: LayerPlan, kept_kv_heads: list[int]) -> None:
    """The plan (and so the dry-run estimate) must have foreseen every KV head that went.

    A module-level seam: benchmarks that swap in another head selection swap this too."""
    if len(kept_kv_heads) != lp.kv_heads_kept:
        raise RuntimeError(f"layer {lp.index}: kept {len(kept_kv_heads)} KV heads, "
                           f"the plan says {lp.kv_heads_kept}")


def _prune_layer(
    layer: nn.Module,
    lp: LayerPlan,
    shape: ModelShape,
    acts: torch.Tensor,
    residual: torch.Tensor,
    ctx: LayerContext,
    config: PruneConfig,
    device: torch.device,
    clock: _Clock,
    emit: Callable[[str, str, dict[str, float]], None],
    comm: Collective,
    *,
    family: Family,
    dense_acts: torch.Tensor | None = None,
    metrics: tuple[OutputMetric, OutputMetric] | None = None,
) -> LayerReport:
    """Prune one layer in place. With ``dense_acts`` (the dense model's residual stream
    entering this layer; target ``dense``) the compensation reconstructs the dense stream, and
    ``dense_acts`` is advanced to this dense layer's output. With ``metrics`` (o_proj's and
    down_proj's output metric; selection ``fisher``) units are scored in the loss's metric."""
    seconds: dict[str, float] = {}
    attn, mlp = layer.self_attn, layer.mlp
    o_proj = family.o_proj(layer)
    n = acts.shape[0]
    batches = list(micro_batches(n, config.batch_size))
    leader = comm.is_leader

    # 1. Attention: Hessian of o_proj's input, then batched greedy head removal.
    emit("attention", f"layer {lp.index}: attention Hessian", {})
    h_attn = HessianAccumulator(o_proj.in_features, device,
                                name=f"layer {lp.index} self_attn.o_proj")
    seen: list[torch.Tensor] = []
    recording = [True]  # off while the dense stream passes through the same module

    def on_o_proj_input(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if recording[0]:
            h_attn.add(args[0])
            if dense_acts is not None:
                seen.append(args[0])

    x_attn = None if dense_acts is None else CrossAccumulator(
        o_proj.out_features, o_proj.in_features, device,
        name=f"layer {lp.index} self_attn.o_proj targets")
    scale = family.residual_scale(layer)
    hook = o_proj.register_forward_pre_hook(on_o_proj_input)
    try:
        with _Phase(clock, seconds, "attn_pass", device):
            for sl in batches:
                x = acts[sl].to(device)
                family.attention_block(layer, x, ctx)
                if x_attn is not None and dense_acts is not None:
                    # The dense block on the dense stream: its output is the target, and the
                    # dense stream's next state.
                    recording[0] = False
                    h_dense = family.attention_block(layer, dense_acts[sl].to(device), ctx)
                    recording[0] = True
                    x_attn.add(_branch_target(h_dense, x, o_proj, scale), seen.pop())
                    dense_acts[sl] = h_dense.to(dense_acts.device)
                del x
    finally:
        hook.remove()
    with _Phase(clock, seconds, "hessian_finalize", device):
        H = _hessian(h_attn, comm)
        C = _cross(x_attn, comm)
        del x_attn
    with _Phase(clock, seconds, "heads", device):
        W = torch.empty(o_proj.weight.shape, dtype=torch.float32, device=device)
        if leader:
            assert H is not None
            W0 = o_proj.weight.detach().float()
            if C is not None:
                W0 = _least_squares_start(W0, C, H, config.percdamp)
            W.copy_(W0 if metrics is None else metrics[0].to_metric_space(W0))
            heads = prune_heads(
                W, _selection_hessian(H, config.method), num_heads=shape.num_heads,
                num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                heads_to_remove=lp.heads_removed, policy=config.gqa_policy,
                percdamp=config.percdamp, swaps=config.local_search,
            )
            check_kv_heads(lp, heads.kept_kv_heads)
            if metrics is not None:
                W = metrics[0].from_metric_space(W)
            pruned_cols = torch.ones(W0.shape[1], dtype=torch.bool, device=W0.device)
            for h in heads.kept_heads:
                pruned_cols[h * shape.head_dim:(h + 1) * shape.head_dim] = False
            W = _apply_method(W0, W, pruned_cols, config.method)
            attn_err_nc, attn_err = output_errors(W0, W, pruned_cols, H)
            del W0, H, C
            info = (heads, attn_err_nc, attn_err)
        heads, attn_err_nc, attn_err = comm.broadcast_object(info if leader else None)
        W = comm.broadcast_(W.contiguous())
        if config.compact:
            compact_attention(attn, family.layout.as_dict(), heads.kept_heads,
                              heads.kept_kv_heads, heads.kv_index, W)
        else:
            o_proj.weight.data.copy_(W)
        del W
    emit("attention", f"layer {lp.index}: kept {len(heads.kept_heads)}/{shape.num_heads} heads"
         + _damping_note(heads.retries, heads.percdamp),
         {"attn_error": attn_err, "attn_error_uncompensated": attn_err_nc,
          "attn_damping_retries": float(heads.retries), "attn_percdamp": heads.percdamp})

    # 2. FFN: Hessian of down_proj's input behind the pruned attention, then channel groups
    # (per expert, on the tokens routed to it, in a mixture of experts).
    moe: ExpertPruning | None = None
    if family.layout.ffn == "experts":
        moe = _prune_expert_ffn(layer, lp, acts, residual, ctx, config, device, clock, seconds,
                                comm, family, batches)
        channels, ffn_err_nc, ffn_err = moe.summary(), moe.error_uncompensated, moe.error
    else:
        down_proj = family.down_proj(layer)
        h_ffn = HessianAccumulator(down_proj.in_features, device,
                                   name=f"layer {lp.index} mlp.down_proj")
        x_ffn = None if dense_acts is None else CrossAccumulator(
            down_proj.out_features, down_proj.in_features, device,
            name=f"layer {lp.index} mlp.down_proj targets")
        with _Phase(clock, seconds, "ffn_pass", device):
            for sl in batches:
                h = family.attention_block(layer, acts[sl].to(device), ctx)
                residual[sl] = h.to(residual.device)
                f = family.ffn_hidden(layer, h)
                h_ffn.add(f)
                if x_ffn is not None and dense_acts is not None:
                    # The FFN is still dense here, so this is the dense layer's output.
                    y_dense = family.ffn_block(layer, dense_acts[sl].to(device))
                    x_ffn.add(_branch_target(y_dense, h, down_proj, scale), f)
                    dense_acts[sl] = y_dense.to(dense_acts.device)
                    del y_dense
                del h, f
        with _Phase(clock, seconds, "hessian_finalize", device):
            H = _hessian(h_ffn, comm)
            C = _cross(x_ffn, comm)
            del x_ffn
        with _Phase(clock, seconds, "ffn", device):
            W = torch.empty(down_proj.weight.shape, dtype=torch.float32, device=device)
            if leader:
                assert H is not None
                W0 = down_proj.weight.detach().float()
                if C is not None:
                    W0 = _least_squares_start(W0, C, H, config.percdamp)
                W.copy_(W0 if metrics is None else metrics[1].to_metric_space(W0))
                channels = prune_channels(
                    W, _selection_hessian(H, config.method), channels_to_remove=lp.channels_removed,
                    percdamp=config.percdamp, min_group=config.min_group,
                    max_group=config.max_group, swaps=config.local_search,
                )
                if metrics is not None:
                    W = metrics[1].from_metric_space(W)
                kept = torch.zeros(W0.shape[1], dtype=torch.bool, device=W0.device)
                kept[channels.kept_channels] = True
                W = _apply_method(W0, W, ~kept, config.method)
                ffn_err_nc, ffn_err = output_errors(W0, W, ~kept, H)
                del W0, H, C
                info = (channels, ffn_err_nc, ffn_err)
            channels, ffn_err_nc, ffn_err = comm.broadcast_object(info if leader else None)
            W = comm.broadcast_(W.contiguous())
            if config.compact:
                compact_mlp(mlp, family.layout.as_dict(), channels.kept_channels, W)
            else:
                down_proj.weight.data.copy_(W)
            del W
    emit("ffn", f"layer {lp.index}: kept {len(channels.kept_channels)}/"
         f"{shape.intermediate_size} channels" + _damping_note(channels.retries, channels.percdamp),
         {"ffn_error": ffn_err, "ffn_error_uncompensated": ffn_err_nc,
          "ffn_damping_retries": float(channels.retries), "ffn_percdamp": channels.percdamp})

    # 3. The pruned layer's outputs become the next layer's inputs.
    with _Phase(clock, seconds, "output_pass", device):
        for sl in batches:
            acts[sl] = family.ffn_block(layer, residual[sl].to(device)).to(acts.device)

    return LayerReport(
        index=lp.index, ratio=lp.ratio,
        heads_kept=heads.kept_heads, kv_heads_kept=heads.kept_kv_heads, kv_index=heads.kv_index,
        channels_kept=channels.kept_channels,
        attn_error_uncompensated=attn_err_nc, attn_error=attn_err,
        ffn_error_uncompensated=ffn_err_nc, ffn_error=ffn_err,
        attn_damping=heads.damping, ffn_damping=channels.damping,
        damping_retries=heads.retries + channels.retries,
        ffn_group_sizes=channels.group_sizes, seconds=seconds,
        attn_damping_retries=heads.retries, ffn_damping_retries=channels.retries,
        attn_percdamp=heads.percdamp, ffn_percdamp=channels.percdamp,
        attn_swaps=heads.swaps, ffn_swaps=channels.swaps,
        expert_channels_kept=None if moe is None else moe.kept,
        expert_tokens=None if moe is None else moe.tokens,
        expert_pooled_share=None if moe is None else moe.pooled_share,
    )


def _prune_expert_ffn(layer: nn.Module, lp: LayerPlan, acts: torch.Tensor,
                      residual: torch.Tensor, ctx: LayerContext, config: PruneConfig,
                      device: torch.device, clock: _Clock, seconds: dict[str, float],
                      comm: Collective, family: Family, batches: list[slice]) -> ExpertPruning:
    """Step 2 for a mixture of experts: per-expert Hessians of the tokens routed to each
    (the pass also fills ``residual``), then every expert pruned on its own."""

    def ffn_inputs(first: bool) -> Any:
        for sl in batches:
            if first:
                h = family.attention_block(layer, acts[sl].to(device), ctx)
                residual[sl] = h.to(residual.device)
            else:
                h = residual[sl].to(device)
            yield family.ffn_input(layer, h)

    with _Phase(clock, seconds, "ffn_pass", device):
        hessians = collect_expert_hessians(family, layer, ffn_inputs, device, comm,
                                           config.expert_min_tokens,
                                           name=f"layer {lp.index} mlp.experts")
    with _Phase(clock, seconds, "ffn", device):
        return prune_experts(
            family, layer, hessians, channels_to_remove=lp.channels_removed,
            percdamp=config.percdamp, min_group=config.min_group, max_group=config.max_group,
            swaps=config.local_search, compact=config.compact, comm=comm, device=device,
            select=functools.partial(_selection_hessian, method=config.method),
            finish=functools.partial(_apply_method, method=config.method))


def _take_layer_metrics(fishers: list[tuple[torch.Tensor, torch.Tensor] | None] | None,
                        index: int) -> tuple[OutputMetric, OutputMetric] | None:
    """Layer ``index``'s output metrics; its Fisher is released (all of them: 4 GB at 8B)."""
    if fishers is None:
        return None
    entry, fishers[index] = fishers[index], None
    if entry is None:
        raise RuntimeError(f"layer {index}'s output Fisher was already used")
    attn, ffn = entry
    return OutputMetric.from_fisher(attn), OutputMetric.from_fisher(ffn)


def _damping_note(retries: int, percdamp: float) -> str:
    if not retries:
        return ""
    return (f" (Hessian not positive definite: damping raised {retries}x to {percdamp:.3g} of "
            "mean diag H" + ("; OBS is close to magnitude pruning here)" if percdamp >= 1 else ")"))


def _resize_to_report(layer: nn.Module, report: dict[str, Any], family: Family) -> None:
    resize_layer(layer, family.layout.as_dict(), len(report["heads_kept"]),
                 len(report["kv_heads_kept"]), len(report["channels_kept"]), report["kv_index"])


class _CheckpointSource:
    """A finished layer's weights from its checkpoint file (resume in the stream placement)."""

    def __init__(self, ckpt: LayerCheckpoints, prefix: str) -> None:
        self.ckpt, self.prefix = ckpt, prefix

    def read_layer(self, index: int, alloc: Any) -> dict[str, torch.Tensor]:
        from slimgpt_core.shards import ShardedCheckpoint, read_header

        path = self.ckpt.layer_file(index)
        reader = ShardedCheckpoint.from_files([path])
        strip = f"{self.prefix}{index}."
        try:
            return {name.removeprefix(strip): reader.read_into(name, alloc(info.shape, info.dtype))
                    for name, info in read_header(path).items()}
        finally:
            reader.close()


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    *,
    source: LayerSource | None = None,
    comm: Collective | None = None,
    probes: dict[str, Probe] | None = None,
    on_layer: LayerSink | None = None,
    plan: PruningPlan | None = None,
    fishers: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> PruneResult:
    """Prune ``model`` in place with SlimGPT on ``calibration`` windows (N x seqlen token ids).

    ``source``: the model is a skeleton (decoder-layer parameters on ``meta``, as
    :func:`slimgpt_core.streaming.open_streamed` builds it) whose layers are read from
    ``source`` one at a time; each pruned layer is written to ``config.checkpoint_dir``
    (required) and the skeleton keeps only its new widths. ``comm``: this process's place in
    a multi-GPU job (every rank calls this with the same arguments; the leader's result is
    the one to keep). ``probes``: windows whose final hidden states are returned.
    ``on_layer(index, tensors, report)``: receives each pruned layer's tensors in host memory
    (on a writer thread, leader only) instead of the checkpoint directory. ``plan`` and
    ``fishers``: a plan and output Fishers already made for this model and config (the
    allocation search prunes its candidates so); the config's allocation is then not run.
    """
    if calibration.dim() != 2 or calibration.shape[0] == 0:
        raise ValueError("calibration must be a non-empty (num_windows, seqlen) tensor of ids")
    started = time.perf_counter()
    comm = comm or Collective()
    streamed = source is not None
    if streamed and config.checkpoint_dir is None and on_layer is None:
        raise ValueError("pruning a streamed model needs checkpoint_dir (or on_layer): pruned "
                         "layers are written there as they finish")
    model.eval()
    family = model_family(model)
    shape = model_shape(model)
    chosen = plan is not None
    if plan is not None and plan.shape != shape:
        raise ValueError("the plan given was made for another model shape")
    if plan is None:
        plan = _config_plan(shape, config)
    layers = family.decoder_layers(model)
    n_layers = len(layers)
    prefix = layers_prefix(model) + "."
    device = _resolve_device(config.device)
    placement = choose_placement(model, device, config.resident, streamed)
    _refuse_unavailable(family, config, placement, comm.world_size)
    if placement == "resident":
        model.to(device)
    if config.allocation == "search" and not chosen:
        search_fit(model, config, device)
    leader = comm.is_leader

    def emit(phase: str, message: str, metrics: dict[str, float], layer: int | None = None) -> None:
        if progress is not None and leader:
            progress(ProgressEvent(phase, layer, n_layers, message,
                                   time.perf_counter() - started, metrics))

    def check_cancel(layers_done: int) -> None:
        cancel = bool(should_cancel()) if (leader and should_cancel is not None) else False
        if comm.broadcast_object(cancel if leader else None):
            raise PruningCancelled(layers_done)

    allocation_s = fisher_s = 0.0
    searched: dict[str, Any] | None = None
    if config.selection == "fisher" and fishers is None:
        emit("fisher", f"output Fisher on {len(calibration[:config.fisher_windows])} windows"
             + (f", {config.fisher_samples} label draws per token" if config.fisher_samples
                else ""), {})
        t0 = time.perf_counter()
        fishers = output_fishers(model, calibration[:config.fisher_windows], device, family,
                                 full=True, label_samples=config.fisher_samples,
                                 seed=config.seed)
        fisher_s = time.perf_counter() - t0
    if config.allocation in ("sensitivity", "search") and not chosen:
        from slimgpt_core.allocation import curve_max_ratio, sensitivity_plan

        check_cancel(0)
        emit("allocation", "per-layer widths from measured sensitivity", {})
        t0 = time.perf_counter()
        base_plan = plan
        plan = sensitivity_plan(model, calibration, plan, config.gqa_policy, config.percdamp,
                                config.min_group, config.max_group, config.batch_size, device,
                                family, fishers=fishers)
        if config.allocation == "search":
            from slimgpt_core.alloc_search import SearchSettings, search_plan

            def prune_to(candidate: PruningPlan) -> None:
                prune_model(model, calibration, replace(config, compact=False,
                                                        checkpoint_dir=None, stop_after=None),
                            plan=candidate, fishers=None if fishers is None else list(fishers))

            def search_step(stage: str, done: int, total: int, kl: float) -> None:
                # a search is minutes on a large model: cancels are honoured at every step
                check_cancel(0)
                if stage == "judge":
                    emit("allocation", f"judged {done}/{total}: the pruned model's KL "
                         f"{kl:.5f}", {"judged": done, "candidates": total, "pruned_kl": kl})
                elif done % max(1, total // 4) == 0:
                    emit("allocation", f"search generation {done}/{total}: stitched KL "
                         f"{kl:.5f}", {"generation": done, "generations": total,
                                       "stitched_kl": kl})

            check_cancel(0)
            emit("allocation", f"refining the widths by search ({config.search_generations} "
                 "generations), then pruning the best few for real", {})
            plan, found = search_plan(model, calibration, plan, config.gqa_policy,
                                      config.percdamp, config.batch_size, device, family,
                                      curve_max_ratio(base_plan),
                                      SearchSettings(generations=config.search_generations,
                                                     seed=config.seed),
                                      prune=prune_to, on_step=search_step)
            searched = found.summary() if found is not None else None
        allocation_s = time.perf_counter() - t0
        emit("allocation", f"per-layer widths chosen ({plan.schedule}) in {allocation_s:.1f} s",
             {"allocation_s": allocation_s,
              **{f"search_{k}": float(v) for k, v in (searched or {}).items()
                 if isinstance(v, (int, float))}})
    dtype = next(layers[0].parameters()).dtype
    store_device = torch.device("cpu") if config.offload_activations else device
    clock = _Clock()
    if allocation_s:
        clock.add("allocation", allocation_s)
    if fisher_s:
        clock.add("fisher", fisher_s)
    params_before = count_parameters(model)
    probes = probes if leader else None

    ckpt: LayerCheckpoints | None = None
    done = 0
    reports: list[LayerReport] = []
    if config.checkpoint_dir is not None:
        fingerprint = {
            "model": getattr(model.config, "_name_or_path", ""),
            # (num_experts joined the shape later: dense checkpoints stay resumable)
            "shape": {k: v for k, v in asdict(shape).items()
                      if not (k == "num_experts" and v == 0)},
            "plan": plan.to_dict()["layers"],
            "config": config.fingerprint(),
            "calibration": tensor_digest(calibration),
            "dtype": str(dtype),
        }
        if not leader:
            comm.barrier()  # the leader creates (or checks) the manifest first
        ckpt = LayerCheckpoints(config.checkpoint_dir, fingerprint)
        if leader:
            comm.barrier()
        done = comm.broadcast_object(min(ckpt.finished_layers(), n_layers) if leader else None)
        for i in range(done):
            report = ckpt.load_report(i)
            reports.append(LayerReport(**report))
            if placement == "stream":
                _resize_to_report(layers[i], report, family)
            elif config.target == "dense":
                pass  # restored during the replay, once the dense stream has passed
            else:
                if config.compact:
                    _resize_to_report(layers[i], report, family)
                ckpt.load_weights(i, layers[i], prefix=f"{prefix}{i}.")

    store = LayerStore(layers, device, placement, source=source,
                       dtype=dtype if streamed else None, prefetch=config.prefetch)
    resume_source = _CheckpointSource(ckpt, prefix) if (ckpt is not None and streamed) else None

    def source_for(i: int) -> LayerSource | None:
        return resume_source if i < done else None

    layer_files: list[Path] = []
    last = n_layers if config.stop_after is None else min(n_layers, config.stop_after)
    probe_states: dict[str, _ProbeState] = {}
    try:
        store.prefetch(0, source_for(0))
        emit("calibrating", f"capturing layer inputs for {calibration.shape[0]} windows", {})
        t0 = time.perf_counter()
        local = comm.share(calibration)
        acts, contexts = capture_layer_inputs(model, local, device, config.batch_size,
                                              store_device)
        contexts = contexts_to(contexts, device)
        for name, probe in (probes or {}).items():
            p_acts, p_contexts = capture_layer_inputs(model, probe.input_ids, device,
                                                      config.batch_size, store_device)
            probe_states[name] = _ProbeState(p_acts, contexts_to(p_contexts, device),
                                             probe.dense)
        clock.add("capture", time.perf_counter() - t0)
        residual = torch.empty_like(acts)
        dense_acts = acts.clone() if config.target == "dense" else None

        if done:
            emit("resumed", f"resuming after {done} finished layers", {}, done)
            t0 = time.perf_counter()
            for i in range(done):
                store.prefetch(i + 1, source_for(i + 1))
                layer = store.acquire(i, source_for(i))
                if dense_acts is not None:
                    # The dense stream passes the layer still dense; then it gets its weights.
                    assert ckpt is not None
                    _layer_forward(layer, dense_acts, contexts[i], config.batch_size, device,
                                   family)
                    if config.compact:
                        _resize_to_report(layer, asdict(reports[i]), family)
                    ckpt.load_weights(i, layer, prefix=f"{prefix}{i}.")
                _layer_forward(layer, acts, contexts[i], config.batch_size, device, family)
                for state in probe_states.values():
                    _layer_forward(layer, state.acts, state.contexts[i], config.batch_size,
                                   device, family)
                store.release(i, layer, changed=dense_acts is not None)
            clock.add("replay", time.perf_counter() - t0)

        for i in range(done, last):
            check_cancel(i)
            if i + 1 < last:
                store.prefetch(i + 1, source_for(i + 1))
            layer = store.acquire(i, source_for(i))

            def layer_emit(phase: str, message: str, metrics: dict[str, float],
                           _i: int = i) -> None:
                emit(phase, message, metrics, _i)

            with _Phase(clock, {}, "probes", device):
                for state in probe_states.values():
                    if state.dense:
                        _layer_forward(layer, state.acts, state.contexts[i], config.batch_size,
                                       device, family)
            report = _prune_layer(layer, plan.layers[i], shape, acts, residual, contexts[i],
                                  config, device, clock, layer_emit, comm, family=family,
                                  dense_acts=dense_acts,
                                  metrics=_take_layer_metrics(fishers, i))
            with _Phase(clock, {}, "probes", device):
                for state in probe_states.values():
                    if not state.dense:
                        _layer_forward(layer, state.acts, state.contexts[i], config.batch_size,
                                       device, family)
            reports.append(report)
            on_host = None
            if on_layer is not None and leader:
                on_host = functools.partial(on_layer, i, report=asdict(report))
            elif ckpt is not None and leader:
                on_host = _checkpoint_writer(ckpt, i, f"{prefix}{i}.", asdict(report))
            store.release(i, layer, changed=True, on_host=on_host)
            raised = report.damping_raised()
            note = "; damping raised on " + ", ".join(
                f"{d['module']} ({d['retries']}x, {d['percdamp_used']:.3g})" for d in raised
            ) if raised else ""
            emit("layer_done", f"layer {i + 1}/{n_layers} done{note}", {
                "attn_error": report.attn_error, "ffn_error": report.ffn_error,
                "heads_kept": float(len(report.heads_kept)),
                "channels_kept": float(len(report.channels_kept)),
                "damping_retries": float(report.damping_retries),
                "attn_percdamp": report.attn_percdamp, "ffn_percdamp": report.ffn_percdamp,
            }, i)
        store.flush()
        del acts, residual, dense_acts
    finally:
        store.close()
    if ckpt is not None and streamed:
        layer_files = [ckpt.layer_file(i) for i in range(last)]
    clock.add("transfer_wait", store.stats.wait_s)
    clock.add("total", clock.elapsed())
    return PruneResult(
        model=model, plan=plan, layers=reports, params_before=params_before,
        params_after=count_parameters(model), seconds=dict(clock.totals), resumed_from=done,
        placement=placement, layer_files=layer_files,
        probe_outputs={k: v.acts.cpu() for k, v in probe_states.items()},
        allocation_search=searched,
        transfer={"bytes_in": float(store.stats.bytes_in),
                  "bytes_out": float(store.stats.bytes_out)},
        settings={**config.fingerprint(), **{k: getattr(config, k) for k in _LATER_SETTINGS}},
    )


def _checkpoint_writer(ckpt: LayerCheckpoints, index: int, prefix: str,
                       report: dict[str, Any]) -> Callable[[dict[str, torch.Tensor]], None]:
    def write(tensors: dict[str, torch.Tensor]) -> None:
        ckpt.save_tensors(index, {prefix + k: v.contiguous() for k, v in tensors.items()},
                          report)

    return write
