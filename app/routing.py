"""Which workers can run a job: the ``resources`` a job asks for against the worker pools.

A pool is a Celery queue whose workers all have the same GPUs. ``SLIMGPT_GPU_POOLS`` lists them
as ``queue=COUNTxTYPE`` entries (``TYPE`` a GPU type of :mod:`slimgpt_core.costs`, optionally
``@MEMORY_GB``), comma-separated, e.g. ``slimgpt=1xh200,slimgpt-2gpu=2xh200,small=1xl40s``.
Unset, there is one pool: ``SLIMGPT_CELERY_QUEUE`` with ``SLIMGPT_WORKER_GPUS`` GPUs of
unknown type (no memory check can be made against it).

A job goes to the pool with the fewest GPUs that has at least as many as it asks for, enough
memory per GPU for its ``min_gpu_memory_gb`` and, when the model's config is known, for the
peak the cost model predicts on that pool; a job that fits no pool is refused at submission
with the estimates that say why. Torch-free: the API imports it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimgpt_core.costs import GPU_TYPES, Workload, estimate_resources
from slimgpt_core.schedule import ModelShape, PlanError, make_plan

_ENTRY = re.compile(r"^\s*(?P<queue>[A-Za-z0-9_.:\-]+)\s*=\s*(?P<count>\d+)\s*x\s*"
                    r"(?P<type>[A-Za-z0-9\-]+)?\s*(?:@\s*(?P<mem>\d+(?:\.\d+)?))?\s*$")


class PoolConfigError(ValueError):
    """SLIMGPT_GPU_POOLS is malformed."""


class NoWorkerPool(ValueError):
    """No worker pool can run the job; ``estimates`` say what it would need on each."""

    def __init__(self, message: str, estimates: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.estimates = estimates


@dataclass(frozen=True)
class WorkerPool:
    queue: str
    gpus: int
    gpu_type: str | None = None
    gpu_memory_gb: float | None = None

    @property
    def memory_gb(self) -> float | None:
        if self.gpu_memory_gb is not None:
            return self.gpu_memory_gb
        return GPU_TYPES[self.gpu_type].memory_gb if self.gpu_type in GPU_TYPES else None

    def describe(self) -> str:
        kind = self.gpu_type or "GPU"
        mem = f" ({self.memory_gb:g} GB)" if self.memory_gb else ""
        return f"{self.queue}: {self.gpus} x {kind}{mem}"


def parse_pools(text: str | None, default_queue: str, default_gpus: int = 1) -> list[WorkerPool]:
    if not text or not text.strip():
        return [WorkerPool(default_queue, max(1, default_gpus))]
    pools = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        m = _ENTRY.match(raw)
        if m is None:
            raise PoolConfigError(f"SLIMGPT_GPU_POOLS entry {raw.strip()!r} is not "
                                  "queue=COUNTxTYPE[@MEMORY_GB]")
        gpu_type = (m["type"] or "").lower() or None
        if gpu_type is not None and gpu_type not in GPU_TYPES:
            raise PoolConfigError(f"SLIMGPT_GPU_POOLS: unknown GPU type {gpu_type!r} "
                                  f"(known: {', '.join(GPU_TYPES)}; or give @MEMORY_GB)")
        count = int(m["count"])
        if count < 1:
            raise PoolConfigError(f"SLIMGPT_GPU_POOLS: {raw.strip()!r} has no GPUs")
        pools.append(WorkerPool(m["queue"], count, gpu_type,
                                float(m["mem"]) if m["mem"] else None))
    if not pools:
        raise PoolConfigError("SLIMGPT_GPU_POOLS lists no pool")
    return pools


def local_config(path: Any) -> dict[str, Any] | None:
    """A local model folder's ``config.json`` (None for a .gguf file or an unreadable one)."""
    import json
    from pathlib import Path

    if path is None:
        return None
    file = Path(path) / "config.json"
    try:
        if file.is_file() and file.stat().st_size <= 1024 * 1024:
            doc = json.loads(file.read_text())
            return doc if isinstance(doc, dict) else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return None


def pools_from_settings(settings: Any) -> list[WorkerPool]:
    return parse_pools(settings.gpu_pools, settings.celery_queue, settings.worker_gpus)


def _plan_inputs(request: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    pruning = request.get("pruning") or {}
    calib = request.get("calibration") or {}
    shape = ModelShape.from_config(config)
    plan = make_plan(shape, float(request["target_ratio"]), request.get("schedule", "log"),
                     pruning.get("gqa_policy"), float(pruning.get("alpha", 0.25)),
                     pruning.get("heads"), pruning.get("ffn"),
                     (request.get("export") or {}).get("profile") == "uniform")
    work = Workload(int(calib.get("num_samples", 128)), int(calib.get("seq_len", 2048)))
    return shape, plan, work


def pool_estimates(request: Mapping[str, Any], config: Mapping[str, Any] | None,
                   pools: list[WorkerPool]) -> list[dict[str, Any]]:
    """The cost model's estimate of the job on each pool (empty without a config)."""
    if config is None:
        return []
    try:
        shape, plan, work = _plan_inputs(request, config)
    except (PlanError, KeyError, TypeError, ValueError):
        return []
    gpus = int((request.get("resources") or {}).get("gpus", 1))
    out = []
    for pool in pools:
        est = estimate_resources(shape, plan, work, gpu_type=pool.gpu_type or "h200",
                                 gpus=gpus, gpu_memory_gb=pool.memory_gb)
        doc = est.to_dict()
        doc["queue"] = pool.queue
        if pool.memory_gb is None:
            doc["fits"], doc["reasons"] = True, []  # nothing known to check against
            doc["note"] = "pool GPU memory unknown; assumed to fit"
        out.append(doc)
    return out


def route(request: Mapping[str, Any], pools: list[WorkerPool],
          config: Mapping[str, Any] | None = None) -> WorkerPool:
    """The pool that runs ``request`` (a job request as stored), or :class:`NoWorkerPool`."""
    resources = request.get("resources") or {}
    gpus = int(resources.get("gpus", 1))
    min_mem = resources.get("min_gpu_memory_gb")
    estimates = {e["queue"]: e for e in pool_estimates(request, config, pools)}
    reasons = []
    fitting = []
    for pool in pools:
        if pool.gpus < gpus:
            reasons.append(f"{pool.describe()}: fewer than {gpus} GPUs")
            continue
        if min_mem is not None and (pool.memory_gb is None or pool.memory_gb < float(min_mem)):
            reasons.append(f"{pool.describe()}: less than {float(min_mem):g} GB per GPU "
                           "(or unknown)")
            continue
        est = estimates.get(pool.queue)
        if est is not None and not est["fits"]:
            reasons.append(f"{pool.describe()}: " + "; ".join(est["reasons"]))
            continue
        fitting.append(pool)
    if not fitting:
        raise NoWorkerPool(
            f"no worker pool can run this job (resources: {gpus} GPU(s)"
            + (f", >= {float(min_mem):g} GB each" if min_mem is not None else "") + "): "
            + " | ".join(reasons), list(estimates.values()))
    return min(fitting, key=lambda p: (p.gpus, p.memory_gb or float("inf")))
