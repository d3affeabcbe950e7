"""SlimGPT, layer by layer: the driver that ties Hessians, OBS and compaction together.

For each decoder layer ``i`` (inputs produced by the already-pruned layers ``0..i-1``):
  1. run the attention block, collecting ``H`` of ``o_proj``'s input; prune heads (batched
     greedy OBS) and compensate ``o_proj``; slice q/k/v/o;
  2. run the pruned attention block (keeping its output ``h``), collecting ``H`` of
     ``down_proj``'s input; prune FFN channels (dynamic groups) and compensate ``down_proj``;
  3. run the pruned FFN block on ``h``: the inputs of layer ``i + 1``.
Only the current layer and the activations sit on the compute device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimgpt_core.channels import prune_channels
from slimgpt_core.checkpoint import LayerCheckpoints, tensor_digest
from slimgpt_core.compact import compact_attention, compact_mlp
from slimgpt_core.heads import prune_heads
from slimgpt_core.hessian import HessianAccumulator
from slimgpt_core.layer_io import (
    LayerContext,
    attention_block,
    capture_layer_inputs,
    check_uniform_attention,
    decoder_layers,
    ffn_block,
    ffn_hidden,
    micro_batches,
)
from slimgpt_core.modeling_slimgpt import resize_layer
from slimgpt_core.obs import output_error
from slimgpt_core.schedule import LayerPlan, ModelShape, PruningPlan, make_plan

METHODS: tuple[str, ...] = ("slimgpt", "no_compensation", "magnitude")


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
    gqa_policy: str = "balanced"
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
    #: False keeps full-size layers with zeroed columns (the "masked" model; for testing).
    compact: bool = True
    checkpoint_dir: str | Path | None = None
    seed: int = 0
    #: "slimgpt" (OBS selection and compensation); the ablations "no_compensation" (same
    #: selection, pruned columns only zeroed) and "magnitude" (weight-norm selection, H = I).
    method: str = "slimgpt"
    #: Only head counts that divide hidden_size (what the `uniform` export profile needs).
    plain_heads: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.batch_size < 1 or self.min_group < 1 or self.max_group < self.min_group:
            raise ValueError("batch_size and min_group must be >= 1 and max_group >= min_group")
        if self.percdamp <= 0:
            raise ValueError("percdamp must be positive")

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change the result (not device, batch size or paths)."""
        keys = ("target_ratio", "schedule", "alpha", "gqa_policy", "head_ratio", "ffn_ratio",
                "percdamp", "min_group", "max_group", "compact", "seed", "method",
                "plain_heads")
        out = {k: getattr(self, k) for k in keys}
        if not isinstance(out["schedule"], str):
            out["schedule"] = list(out["schedule"])
        return out


@dataclass
class ProgressEvent:
    phase: str  # calibrating | attention | ffn | layer_done | resumed
    layer: int | None
    num_layers: int
    message: str
    elapsed_s: float
    metrics: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]


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
class PruneResult:
    model: nn.Module
    plan: PruningPlan
    layers: list[LayerReport]
    params_before: int
    params_after: int
    seconds: dict[str, float]
    resumed_from: int = 0

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
            "damping_raised": self.damping_raised(),
        }


def model_shape(model: nn.Module) -> ModelShape:
    return ModelShape.from_config(model.config.to_dict())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _should_be_resident(model: nn.Module, device: torch.device, resident: bool | None) -> bool:
    if device.type != "cuda" or resident is False:
        return False
    if resident:
        return True
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _total = torch.cuda.mem_get_info(device)
    return size < free / 2


def _resolve_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.totals: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


@torch.no_grad()
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
) -> LayerReport:
    seconds: dict[str, float] = {}
    attn, mlp = layer.self_attn, layer.mlp
    n = acts.shape[0]
    batches = list(micro_batches(n, config.batch_size))

    # 1. Attention: Hessian of o_proj's input, then batched greedy head removal.
    emit("attention", f"layer {lp.index}: attention Hessian", {})
    h_attn = HessianAccumulator(attn.o_proj.in_features, device,
                                name=f"layer {lp.index} self_attn.o_proj")
    hook = attn.o_proj.register_forward_pre_hook(lambda _m, args: h_attn.add(args[0]))
    try:
        with _Phase(clock, seconds, "attn_pass", device):
            for sl in batches:
                attention_block(layer, acts[sl].to(device), ctx)
    finally:
        hook.remove()
    with _Phase(clock, seconds, "hessian_finalize", device):
        H = h_attn.hessian()
    with _Phase(clock, seconds, "heads", device):
        W0 = attn.o_proj.weight.detach().float()
        W = W0.clone()
        heads = prune_heads(
            W, _selection_hessian(H, config.method), num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim, heads_to_remove=lp.heads_removed,
            policy=config.gqa_policy, percdamp=config.percdamp,
        )
        if len(heads.kept_kv_heads) != lp.kv_heads_kept:
            raise RuntimeError(f"layer {lp.index}: kept {len(heads.kept_kv_heads)} KV heads, "
                               f"the plan says {lp.kv_heads_kept}")
        pruned_cols = torch.ones(W0.shape[1], dtype=torch.bool, device=W0.device)
        for h in heads.kept_heads:
            pruned_cols[h * shape.head_dim:(h + 1) * shape.head_dim] = False
        W = _apply_method(W0, W, pruned_cols, config.method)
        attn_err_nc = output_error(W0, W0.masked_fill(pruned_cols[None, :], 0.0), H)
        attn_err = output_error(W0, W, H)
        if config.compact:
            compact_attention(attn, heads.kept_heads, heads.kept_kv_heads, heads.kv_index, W)
        else:
            attn.o_proj.weight.data.copy_(W)
        del W0, W, H
    emit("attention", f"layer {lp.index}: kept {len(heads.kept_heads)}/{shape.num_heads} heads"
         + _damping_note(heads.retries, heads.percdamp),
         {"attn_error": attn_err, "attn_error_uncompensated": attn_err_nc,
          "attn_damping_retries": float(heads.retries), "attn_percdamp": heads.percdamp})

    # 2. FFN: Hessian of down_proj's input behind the pruned attention, then channel groups.
    h_ffn = HessianAccumulator(mlp.down_proj.in_features, device,
                               name=f"layer {lp.index} mlp.down_proj")
    with _Phase(clock, seconds, "ffn_pass", device):
        for sl in batches:
            h = attention_block(layer, acts[sl].to(device), ctx)
            residual[sl] = h.to(residual.device)
            h_ffn.add(ffn_hidden(layer, h))
    with _Phase(clock, seconds, "hessian_finalize", device):
        H = h_ffn.hessian()
    with _Phase(clock, seconds, "ffn", device):
        W0 = mlp.down_proj.weight.detach().float()
        W = W0.clone()
        channels = prune_channels(
            W, _selection_hessian(H, config.method), channels_to_remove=lp.channels_removed, percdamp=config.percdamp,
            min_group=config.min_group, max_group=config.max_group,
        )
        kept = torch.zeros(W0.shape[1], dtype=torch.bool, device=W0.device)
        kept[channels.kept_channels] = True
        W = _apply_method(W0, W, ~kept, config.method)
        ffn_err_nc = output_error(W0, W0.masked_fill(~kept[None, :], 0.0), H)
        ffn_err = output_error(W0, W, H)
        if config.compact:
            compact_mlp(mlp, channels.kept_channels, W)
        else:
            mlp.down_proj.weight.data.copy_(W)
        del W0, W, H
    emit("ffn", f"layer {lp.index}: kept {len(channels.kept_channels)}/"
         f"{shape.intermediate_size} channels" + _damping_note(channels.retries, channels.percdamp),
         {"ffn_error": ffn_err, "ffn_error_uncompensated": ffn_err_nc,
          "ffn_damping_retries": float(channels.retries), "ffn_percdamp": channels.percdamp})

    # 3. The pruned layer's outputs become the next layer's inputs.
    with _Phase(clock, seconds, "output_pass", device):
        for sl in batches:
            acts[sl] = ffn_block(layer, residual[sl].to(device)).to(acts.device)

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
    )


def _damping_note(retries: int, percdamp: float) -> str:
    if not retries:
        return ""
    return (f" (Hessian not positive definite: damping raised {retries}x to {percdamp:.3g} of "
            "mean diag H" + ("; OBS is close to magnitude pruning here)" if percdamp >= 1 else ")"))


@torch.no_grad()
def _replay_layer(layer: nn.Module, acts: torch.Tensor, ctx: LayerContext, batch_size: int,
                  device: torch.device) -> None:
    """Recompute a finished layer's outputs exactly as :func:`_prune_layer` produced them."""
    for sl in micro_batches(acts.shape[0], batch_size):
        h = attention_block(layer, acts[sl].to(device), ctx)
        acts[sl] = ffn_block(layer, h).to(acts.device)


def _restore_layer(layer: nn.Module, report: dict[str, Any], ckpt: LayerCheckpoints,
                   compact: bool) -> None:
    if compact:
        resize_layer(layer, len(report["heads_kept"]), len(report["kv_heads_kept"]),
                     len(report["channels_kept"]), report["kv_index"])
    ckpt.load_weights(report["index"], layer)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> PruneResult:
    """Prune ``model`` in place with SlimGPT on ``calibration`` windows (N x seqlen token ids)."""
    if calibration.dim() != 2 or calibration.shape[0] == 0:
        raise ValueError("calibration must be a non-empty (num_windows, seqlen) tensor of ids")
    model.eval()
    check_uniform_attention(model)
    shape = model_shape(model)
    plan = make_plan(shape, config.target_ratio, config.schedule, config.gqa_policy,
                     config.alpha, config.head_ratio, config.ffn_ratio, config.plain_heads)
    layers = decoder_layers(model)
    n_layers = len(layers)
    device = _resolve_device(config.device)
    if _should_be_resident(model, device, config.resident):
        model.to(device)
    store = torch.device("cpu") if config.offload_activations else device
    clock = _Clock()
    params_before = count_parameters(model)

    def emit(phase: str, message: str, metrics: dict[str, float], layer: int | None = None) -> None:
        if progress is not None:
            progress(ProgressEvent(phase, layer, n_layers, message, clock.elapsed(), metrics))

    ckpt: LayerCheckpoints | None = None
    done = 0
    reports: list[LayerReport] = []
    if config.checkpoint_dir is not None:
        fingerprint = {
            "model": getattr(model.config, "_name_or_path", ""),
            "shape": asdict(shape),
            "plan": plan.to_dict()["layers"],
            "config": config.fingerprint(),
            "calibration": tensor_digest(calibration),
            "dtype": str(next(model.parameters()).dtype),
        }
        ckpt = LayerCheckpoints(config.checkpoint_dir, fingerprint)
        done = min(ckpt.finished_layers(), n_layers)
        for i in range(done):
            report = ckpt.load_report(i)
            _restore_layer(layers[i], report, ckpt, config.compact)
            reports.append(LayerReport(**report))

    emit("calibrating", f"capturing layer inputs for {calibration.shape[0]} windows", {})
    t0 = time.perf_counter()
    acts, ctx = capture_layer_inputs(model, calibration, device, config.batch_size, store)
    ctx = ctx.to(device)
    clock.add("capture", time.perf_counter() - t0)
    residual = torch.empty_like(acts)

    if done:
        emit("resumed", f"resuming after {done} finished layers", {}, done)
        t0 = time.perf_counter()
        for i in range(done):
            home = next(layers[i].parameters()).device
            layers[i].to(device)
            _replay_layer(layers[i], acts, ctx, config.batch_size, device)
            layers[i].to(home)
        clock.add("replay", time.perf_counter() - t0)

    for i in range(done, n_layers):
        if should_cancel is not None and should_cancel():
            raise PruningCancelled(i)
        layer = layers[i]
        home = next(layer.parameters()).device
        t0 = time.perf_counter()
        layer.to(device)
        clock.add("transfer", time.perf_counter() - t0)

        def layer_emit(phase: str, message: str, metrics: dict[str, float], _i: int = i) -> None:
            emit(phase, message, metrics, _i)

        report = _prune_layer(layer, plan.layers[i], shape, acts, residual, ctx, config, device,
                              clock, layer_emit)
        t0 = time.perf_counter()
        layer.to(home)
        clock.add("transfer", time.perf_counter() - t0)
        reports.append(report)
        if ckpt is not None:
            ckpt.save(i, layer, asdict(report))
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

    del acts, residual
    clock.add("total", clock.elapsed())
    return PruneResult(
        model=model, plan=plan, layers=reports, params_before=params_before,
        params_after=count_parameters(model), seconds=dict(clock.totals), resumed_from=done,
    )
