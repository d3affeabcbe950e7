"""A stand-in for ``worker.runner.run_job`` that writes the same kind of rows the real runner
writes (claim, phase events, one ``layer_done`` event per layer with kept heads/channels and
errors, artifacts, final metrics), at a pace a browser can watch. No torch, no model.

Jobs whose ``model_id`` contains ``slow`` take ``slow_delay_s`` per layer (a test cancels them);
``fail`` in the model id makes the job fail with a coded error.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from app.core.config import Settings
from app.crud import jobs as crud
from app.db.session import session_scope

PHASES_AFTER = (("verifying", 85.0, "exporting the pruned model and verifying it loads"),
                ("evaluating", 92.0, "perplexity on 16 windows"),
                ("publishing", 97.0, "publishing the model"))


def layer_metrics(i: int, n: int, ratio: float, heads: int = 9,
                  channels: int = 1536) -> dict[str, float]:
    """Plausible per-layer figures of a log schedule (later layers pruned harder)."""
    r0, r1 = ratio * 0.4, min(0.9, ratio * 1.5)
    r = r0 + (r1 - r0) * math.log(i + 1) / math.log(max(2, n))
    return {"kind": "layer_done", "heads_kept": float(max(1, round(heads * (1 - r)))),
            "channels_kept": float(max(8, 8 * round(channels * (1 - r) / 8))),
            "attn_error": round(0.002 * 1.55 ** i, 6), "ffn_error": round(0.03 * 1.35 ** i, 6)}


def make_runner(settings: Settings, *, layers: int = 8, delay_s: float = 0.25,
                slow_layers: int = 40, slow_delay_s: float = 0.5) -> Callable[[str], None]:
    def event(job_id: str, phase: str, message: str, **kw: object) -> None:
        with session_scope(settings) as s:
            crud.add_event(s, job_id, phase=phase, message=message, **kw)  # type: ignore[arg-type]

    def cancelled(job_id: str) -> bool:
        with session_scope(settings) as s:
            return crud.is_cancel_requested(s, job_id)

    def run(job_id: str) -> None:
        with session_scope(settings) as s:
            job = crud.claim_job(s, job_id, "fake-worker", 60)
            if job is None:
                return
            model_id, ratio = job.model_id, float(job.request["target_ratio"])
        slow = "slow" in model_id
        n, delay = (slow_layers, slow_delay_s) if slow else (layers, delay_s)
        started = time.monotonic()
        event(job_id, "loading", f"resolving model {model_id}", percent=0.0)
        event(job_id, "loading", f"loaded {model_id} ({n} layers)", num_layers=n, percent=4.0)
        event(job_id, "calibrating", "building 128 calibration windows", percent=5.0)
        event(job_id, "pruning", f"pruning {n} layers to target ratio {ratio}", percent=10.0)
        t0 = time.monotonic()
        for i in range(n):
            if cancelled(job_id):
                with session_scope(settings) as s:
                    crud.finish_job(s, job_id, "cancelled", message="job cancelled",
                                    metrics={"seconds": {"pruning": time.monotonic() - t0}})
                return
            time.sleep(delay)
            per_layer = (time.monotonic() - t0) / (i + 1)
            event(job_id, "pruning", f"layer {i + 1}/{n} done", layer=i, num_layers=n,
                  percent=round(10 + 75 * (i + 1) / n, 2), eta_s=round(per_layer * (n - i - 1), 1),
                  metrics=layer_metrics(i, n, ratio))
        if "fail" in model_id:
            with session_scope(settings) as s:
                crud.finish_job(s, job_id, "failed", error="model_load_failed: no config.json",
                                metrics={"error_code": "model_load_failed"})
            return
        for phase, percent, message in PHASES_AFTER:
            event(job_id, phase, message, percent=percent)
            time.sleep(delay / 2)
        folder = Path(settings.artifacts_dir) / job_id / "model"  # type: ignore[arg-type]
        folder.mkdir(parents=True, exist_ok=True)
        files = {"config.json": json.dumps({"model_type": "llama", "num_hidden_layers": n}),
                 "README.md": f"# {model_id} pruned by {ratio:.0%}\n",
                 "pruning_config.json": json.dumps({"target_ratio": ratio})}
        with session_scope(settings) as s:
            for name, text in files.items():
                path = folder / name
                path.write_text(text)
                crud.add_artifact(s, job_id, path, path.stat().st_size,
                                  hashlib.sha256(text.encode()).hexdigest())
        total = time.monotonic() - started
        with session_scope(settings) as s:
            crud.finish_job(s, job_id, "succeeded", result={"location": str(folder)}, metrics={
                "params_before": 134_515_008, "params_after": int(134_515_008 * (1 - ratio)),
                "achieved_ratio": ratio, "perplexity_before": 24.41,
                "perplexity_after": round(24.41 * (1 + ratio * 1.6), 2),
                "peak_gpu_memory_bytes": 3 * 1024**3,
                "seconds": {"loading": 0.1, "calibrating": 0.1, "pruning": total * 0.8,
                            "verifying": total * 0.1, "evaluating": 0.05, "publishing": 0.05}})

    return run


def run_job(job_id: str) -> None:
    """``SLIMGPT_RUNNER=tests.ui.progress_runner:run_job`` for real worker processes; pace from
    ``SLIMGPT_TEST_FAKE_LAYERS`` / ``SLIMGPT_TEST_FAKE_DELAY_S``."""
    import os

    settings = Settings()
    make_runner(settings, layers=int(os.environ.get("SLIMGPT_TEST_FAKE_LAYERS", "8")),
                delay_s=float(os.environ.get("SLIMGPT_TEST_FAKE_DELAY_S", "0.25")))(job_id)
