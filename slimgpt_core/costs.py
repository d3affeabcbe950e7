"""What a pruning job will need: GPU memory, host memory, disk and time, per GPU type and count.

Torch-free (the API's ``/v1/estimate`` and submission checks import it). The arithmetic follows
what the pruner does (:mod:`slimgpt_core.pruner`): per layer, the calibration windows go
through the attention block, the pruned attention plus gate/up, and the pruned FFN (the work
is split across GPUs), two Hessians are accumulated, and the leader runs the OBS maths on the
``o_proj`` and ``down_proj`` Hessians. Time coefficients were fitted on the H200 benchmark runs
in ``benchmarks/results/h200_scale.jsonl`` by ``benchmarks/fit_costs.py``; its printout (and
``docs/BENCHMARKS.md``) gives the error on every run. Other GPU types are scaled from the H200
by datasheet ratios (bf16 tensor rate for the forwards, fp32 rate for the maths): those are
estimates nobody has measured here, and the result says so. Mixture of experts: the Hessian
memory and the OBS maths count every expert (:mod:`slimgpt_core.experts`); the forward-pass
terms still price a dense FFN of the per-expert width, and no MoE run has been timed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from slimgpt_core.schedule import ModelShape, PruningPlan

GiB = 2**30


@dataclass(frozen=True)
class GPUType:
    name: str
    memory_gb: float  # usable device memory, GB (1e9)
    bf16_tflops: float  # dense tensor-core rate, datasheet
    fp32_tflops: float  # non-tensor fp32 rate, datasheet
    measured: bool = False  # coefficients fitted on runs of this type


#: Datasheet figures; only the H200 was measured (the other rows scale its fitted times).
GPU_TYPES: dict[str, GPUType] = {
    "h200": GPUType("h200", 141.0, 989.0, 67.0, measured=True),
    "h100-80gb": GPUType("h100-80gb", 80.0, 989.0, 67.0),
    "a100-80gb": GPUType("a100-80gb", 80.0, 312.0, 19.5),
    "a100-40gb": GPUType("a100-40gb", 40.0, 312.0, 19.5),
    "l40s": GPUType("l40s", 48.0, 362.0, 91.6),
}
REFERENCE_GPU = "h200"


@dataclass(frozen=True)
class Coefficients:
    """Fitted on H200 runs (``benchmarks/fit_costs.py``); seconds unless said otherwise."""

    pass_s_per_pflop: float = 1.936  # layer forwards + Hessian accumulation
    ffn_maths_s_per_tflop3: float = 0.05551  # FFN OBS maths per (intermediate width)^3 / 1e12
    ffn_maths_s: float = 0.07367  # fixed part of the FFN maths per layer
    heads_s_per_unit: float = 1.313e-12  # per removed head x (attention width)^2 x width
    heads_s: float = 0.01719  # fixed part of the head maths per layer
    layer_overhead_s: float = 0.02411  # syncs, bookkeeping per layer
    startup_s: float = 0.01942  # capture + first-layer warm-up, model already placed
    startup_stream_s: float = 1.563  # ... when the first layer has to be fetched
    startup_s_per_embed_gb: float = 1.018  # embedding the windows on the GPU
    #: Not fitted (no separate measurement); conservative rates for what was not timed.
    host_to_device_gbps: float = 6.0  # pageable model move of the resident placement
    interconnect_gbps: float = 80.0  # Hessian reduce + weight broadcast between GPUs
    disk_read_gbps: float = 1.5  # streaming from a checkpoint that is not in page cache
    disk_write_gbps: float = 1.0  # writing the output shards
    #: Relative error of the time model on the fitted runs (max |pred / measured - 1|) and
    #: in leave-one-shape-out fits; refreshed by fit_costs.py.
    error_fit: float = 0.08
    error_leave_one_out: float = 0.10


COEFFICIENTS = Coefficients()
#: Memory the process uses besides tensors (CUDA context and allocator slack, which torch's
#: max_memory_allocated does not count; host: python, torch, transformers); and the host memory share a streamed model decision leaves free.
GPU_BASE_BYTES = 1.0 * GiB
HOST_BASE_BYTES = 1.0 * GiB
#: The same for a process that moves layers through pinned buffers (offloaded or streamed):
#: reader and writer threads, the pinned allocator's pool, CUDA's host-side state. Set from
#: the whole-model runs of 2026-11-30 (70B on 1 and 2 H200s, 13B from disk), which the 1 GiB
#: above under-predicted by 21-36%.
HOST_STREAM_BASE_BYTES = 2.0 * GiB
STREAM_HOST_SHARE = 0.6


@dataclass(frozen=True)
class Workload:
    """The calibration data and the compute dtype of a job."""

    num_samples: int = 128
    seq_len: int = 2048
    batch_size: int = 8
    dtype_bytes: int = 2  # bf16/fp16 on GPUs

    @property
    def tokens(self) -> int:
        return self.num_samples * self.seq_len


def _attn_params(shape: ModelShape, heads: int, kv_heads: int) -> int:
    return heads * shape.params_per_q_head + kv_heads * shape.params_per_kv_head


def layer_work(shape: ModelShape, plan: PruningPlan, work: Workload,
               layers: int | None = None) -> dict[str, float]:
    """Totals over the first ``layers`` layers (default all) of what the pruner computes."""
    chosen = plan.layers[:layers] if layers is not None else plan.layers
    T = work.tokens
    h, f = shape.hidden_size, shape.intermediate_size
    q = shape.num_heads * shape.head_dim
    dense_attn = _attn_params(shape, shape.num_heads, shape.num_kv_heads)
    gemm = 0.0
    sdpa = 0.0
    heads_units = 0.0
    for lp in chosen:
        kept_attn = _attn_params(shape, lp.heads_kept, lp.kv_heads_kept)
        # attention pass (dense), FFN pass (pruned attention, dense gate/up), output pass
        # (pruned FFN); each linear map costs 2 FLOP per weight and token.
        gemm += 2 * T * (dense_attn + kept_attn + 2 * h * f + 3 * h * lp.channels_kept)
        gemm += 2 * T * (q * q + f * f)  # the two Hessians
        per_head = 2 * work.seq_len * shape.head_dim * work.seq_len  # QK^T and PV, causal half
        sdpa += work.num_samples * per_head * (shape.num_heads + lp.heads_kept)
        heads_units += lp.heads_removed * q * q * q / max(1, shape.num_heads)
    layer_bytes = shape.dense_layer_params * work.dtype_bytes
    return {
        "pass_flop": gemm + sdpa,
        "layers": float(len(chosen)),
        # a mixture of experts runs the FFN maths once per expert
        "ffn_maths": len(chosen) * max(1, shape.num_experts) * f ** 3 / 1e12,
        "heads_units": heads_units,
        "layer_bytes": float(layer_bytes),
        "model_bytes": float((shape.num_layers * shape.dense_layer_params
                              + shape.non_layer_params) * work.dtype_bytes),
        "pruned_bytes": float(plan.total_params_after * work.dtype_bytes),
        "embed_bytes": float(shape.vocab_size * shape.hidden_size * work.dtype_bytes),
        "non_layer_bytes": float(shape.non_layer_params * work.dtype_bytes),
    }


def predict_seconds(shape: ModelShape, plan: PruningPlan, work: Workload, *, gpus: int = 1,
                    placement: str = "host", gpu: str = REFERENCE_GPU,
                    layers: int | None = None, from_disk_cache: bool = True,
                    coef: Coefficients = COEFFICIENTS) -> dict[str, float]:
    """Seconds of pruning (``layers`` first layers, default all): startup, per layer, total."""
    g = GPU_TYPES[gpu]
    ref = GPU_TYPES[REFERENCE_GPU]
    w = layer_work(shape, plan, work, layers)
    n = int(w["layers"])
    pass_s = coef.pass_s_per_pflop * w["pass_flop"] / 1e15 / gpus * ref.bf16_tflops / g.bf16_tflops
    maths_s = (coef.ffn_maths_s_per_tflop3 * w["ffn_maths"] + coef.ffn_maths_s * n
               + coef.heads_s_per_unit * w["heads_units"] + coef.heads_s * n)
    maths_s *= ref.fp32_tflops / g.fp32_tflops
    comm_s = 0.0
    if gpus > 1:
        q = shape.num_heads * shape.head_dim
        f, h = shape.intermediate_size, shape.hidden_size
        comm_bytes = 4 * (q * q + f * f) + 4 * h * (q + f)  # Hessians in, weights out (fp32)
        comm_s = n * comm_bytes / (coef.interconnect_gbps * 1e9)
    per_layer = (pass_s + maths_s + comm_s) / n + coef.layer_overhead_s
    if placement == "stream" and not from_disk_cache:
        # Reading overlaps compute: the slower of the two sets the pace.
        per_layer = max(per_layer, w["layer_bytes"] / (coef.disk_read_gbps * 1e9))
    startup = coef.startup_s_per_embed_gb * w["embed_bytes"] / 1e9
    startup += coef.startup_s if placement == "resident" else coef.startup_stream_s
    move = w["model_bytes"] / (coef.host_to_device_gbps * 1e9) if placement == "resident" else 0.0
    total = startup + move + per_layer * n
    return {"startup_s": startup, "move_s": move, "per_layer_s": per_layer, "total_s": total}


def gpu_type_for(device_name: str, memory_gb: float) -> str | None:
    """The :data:`GPU_TYPES` key of a CUDA device from its name and memory (None: unknown)."""
    name = device_name.upper()
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100-80gb"
    if "A100" in name:
        return "a100-80gb" if memory_gb > 50 else "a100-40gb"
    if "L40S" in name:
        return "l40s"
    return None


#: Windows per step of the budget search (the pruner's default micro-batch).
BUDGET_STEP = 8


def calibration_for_budget(shape: ModelShape, plan: PruningPlan, budget_s: float, *,
                           seq_len: int, batch_size: int = 8, gpu: str = REFERENCE_GPU,
                           gpus: int = 1, placement: str = "resident",
                           maximum: int = 4096) -> int:
    """The most calibration windows (a multiple of :data:`BUDGET_STEP`, at most ``maximum``)
    whose predicted pruning time fits ``budget_s`` on ``gpus`` GPUs of type ``gpu`` and whose
    activations fit its memory: more text for the same wall time, where a fixed window count
    leaves a fast GPU idle on a small model (SmolLM2-135M: 64 -> 256 windows of 512 tokens
    took perplexity 1.77x -> 1.66x dense at 50%, docs/BENCHMARKS.md). Raises
    :class:`ValueError` when not even :data:`BUDGET_STEP` windows fit."""
    if budget_s <= 0:
        raise ValueError("the calibration time budget must be positive")
    if gpu not in GPU_TYPES:
        raise ValueError(f"unknown GPU type {gpu!r}; known: {', '.join(GPU_TYPES)}")
    memory = GPU_TYPES[gpu].memory_gb * 1e9

    def fits(n: int) -> bool:
        work = Workload(n, seq_len, batch_size)
        seconds = predict_seconds(shape, plan, work, gpus=gpus, placement=placement,
                                  gpu=gpu)["total_s"]
        return seconds <= budget_s and gpu_peak_bytes(shape, work, gpus=gpus,
                                                      placement=placement) <= memory

    lo, hi = 0, maximum // BUDGET_STEP  # steps; time and memory grow with the windows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * BUDGET_STEP):
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise ValueError(f"not even {BUDGET_STEP} windows of {seq_len} tokens fit a "
                         f"{budget_s:g} s budget on {gpus} x {gpu}")
    return lo * BUDGET_STEP


def gpu_peak_bytes(shape: ModelShape, work: Workload, *, gpus: int = 1,
                   placement: str = "host", include_base: bool = True) -> float:
    """Peak device memory of the leader (the busiest GPU): activations (the windows' hidden
    states and residuals), the layer being pruned and the next one arriving, and the larger of
    the forward-pass working set and the maths (Hessian, its factor and inverse)."""
    h, f = shape.hidden_size, shape.intermediate_size
    local_tokens = -(-work.num_samples // gpus) * work.seq_len
    acts = 2 * local_tokens * h * work.dtype_bytes
    layer = shape.dense_layer_params * work.dtype_bytes
    layers = layer if placement == "resident" else 2 * layer
    forward = 4 * f * f + work.batch_size * work.seq_len * (3 * f + 4 * h) * work.dtype_bytes
    maths = 3 * 4 * f * f + 2 * 4 * f * min(f, 4096) + 3 * 4 * h * f
    if shape.num_experts:
        # Every expert's Hessian is held at once, and at worst a pooled one per expert too
        # (slimgpt_core.experts' few-token policy); the compensated down_proj of all experts.
        maths += 2 * 4 * f * f * shape.num_experts + 4 * h * f * shape.num_experts
    model = (shape.num_layers * shape.dense_layer_params + shape.non_layer_params) * \
        work.dtype_bytes if placement == "resident" else 0
    base = GPU_BASE_BYTES if include_base else 0  # torch's allocator peak does not see it
    return float(acts + layers + max(forward, maths) + model + base)


def pinned_bytes(nbytes: float) -> float:
    """What a pinned buffer of ``nbytes`` takes: torch's pinned-memory allocator rounds every
    allocation up to a power of two."""
    return float(2 ** math.ceil(math.log2(nbytes))) if nbytes > 1 else float(max(nbytes, 0))


def host_peak_bytes(shape: ModelShape, work: Workload, *, placement: str = "host",
                    gpus: int = 1) -> float:
    """Peak host memory of the whole job (all its processes): the whole model unless streamed
    (then what lies outside the decoder layers), a pinned inbound buffer of one layer, and the
    process itself, in every rank; plus the leader's outbound buffer. Each rank of a multi-GPU
    job is a process with its own copy of what lies outside the layers."""
    layer = shape.dense_layer_params * work.dtype_bytes
    whole = (shape.num_layers * shape.dense_layer_params + shape.non_layer_params) * \
        work.dtype_bytes
    if placement == "resident":
        return float(whole + HOST_BASE_BYTES + 8 * work.tokens)
    held = shape.non_layer_params * work.dtype_bytes if placement == "stream" else whole
    slab = pinned_bytes(layer)
    rank = held + slab + HOST_STREAM_BASE_BYTES + 8 * work.tokens
    return float(gpus * rank + slab)


def choose_placement(model_bytes: float, gpu_bytes: float, host_bytes: float | None) -> str:
    """What the pruner and the worker pick: the model on the GPU when it takes less than half
    of it, in host memory when it fits the host share, else streamed from disk. With the host
    memory unknown, ``stream``: its (small) host peak is what the job needs at least, and it
    takes the same time as holding the model in host memory (both overlap the transfers)."""
    if model_bytes < gpu_bytes / 2:
        return "resident"
    if host_bytes is not None and model_bytes <= STREAM_HOST_SHARE * host_bytes:
        return "host"
    return "stream"


@dataclass
class ResourceEstimate:
    gpu_type: str
    gpus: int
    placement: str
    peak_gpu_gb: float
    peak_host_gb: float
    output_disk_gb: float
    scratch_disk_gb: float
    predicted_s: float
    predicted_error: float
    fits: bool
    reasons: list[str]
    measured_gpu_type: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_resources(shape: ModelShape, plan: PruningPlan, work: Workload | None = None, *,
                       gpu_type: str = REFERENCE_GPU, gpus: int = 1,
                       host_memory_gb: float | None = None,
                       gpu_memory_gb: float | None = None) -> ResourceEstimate:
    """Peak GPU/host memory, disk and time of pruning ``shape`` by ``plan`` on ``gpus`` GPUs
    of ``gpu_type`` (``gpu_memory_gb`` overrides the type's memory)."""
    if gpu_type not in GPU_TYPES:
        raise ValueError(f"unknown GPU type {gpu_type!r}; known: {', '.join(GPU_TYPES)}")
    if gpus < 1:
        raise ValueError("gpus must be >= 1")
    work = work or Workload()
    g = GPU_TYPES[gpu_type]
    gpu_bytes = (gpu_memory_gb or g.memory_gb) * 1e9
    host_bytes = host_memory_gb * 1e9 if host_memory_gb else None
    w = layer_work(shape, plan, work)
    placement = choose_placement(w["model_bytes"], gpu_bytes, host_bytes)
    if gpus > 1 and placement != "stream":
        placement = "stream"  # every rank reads the shards; host memory must not grow with N
    peak_gpu = gpu_peak_bytes(shape, work, gpus=gpus, placement=placement)
    peak_host = host_peak_bytes(shape, work, placement=placement, gpus=gpus)
    seconds = predict_seconds(shape, plan, work, gpus=gpus, placement=placement, gpu=gpu_type)
    export_s = w["pruned_bytes"] / (COEFFICIENTS.disk_write_gbps * 1e9)
    reasons = []
    if peak_gpu > gpu_bytes:
        reasons.append(f"needs {peak_gpu / 1e9:.1f} GB on the busiest GPU, a {gpu_type} has "
                       f"{gpu_bytes / 1e9:.0f} GB")
    if host_bytes is not None and peak_host > host_bytes:
        reasons.append(f"needs {peak_host / 1e9:.1f} GB of host memory, the host has "
                       f"{host_bytes / 1e9:.0f} GB")
    error = COEFFICIENTS.error_leave_one_out if g.measured else max(
        0.5, COEFFICIENTS.error_leave_one_out)
    # Checkpoints of finished layers sit beside the output until the job publishes; streamed
    # jobs hard-link them into the output instead of copying.
    scratch = 0.0 if placement == "stream" else w["pruned_bytes"]
    return ResourceEstimate(
        gpu_type=gpu_type, gpus=gpus, placement=placement,
        peak_gpu_gb=round(peak_gpu / 1e9, 2), peak_host_gb=round(peak_host / 1e9, 2),
        output_disk_gb=round(w["pruned_bytes"] / 1e9, 2),
        scratch_disk_gb=round(scratch / 1e9, 2),
        predicted_s=round(seconds["total_s"] + export_s, 1), predicted_error=error,
        fits=not reasons, reasons=reasons, measured_gpu_type=g.measured,
    )


def estimate_table(shape: ModelShape, plan: PruningPlan, work: Workload | None = None,
                   gpu_types: list[str] | None = None, gpu_counts: tuple[int, ...] = (1, 2, 4, 8),
                   host_memory_gb: float | None = None) -> list[dict[str, Any]]:
    """:func:`estimate_resources` for every GPU type and count."""
    return [estimate_resources(shape, plan, work, gpu_type=t, gpus=n,
                               host_memory_gb=host_memory_gb).to_dict()
            for t in (gpu_types or list(GPU_TYPES)) for n in gpu_counts]
