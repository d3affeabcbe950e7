"""Which pruning settings a model, a placement and a GPU count can run: one rule for the
pruner (which refuses), the worker (which fails a job before loading calibration text) and
the API's estimate. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimgpt_core.families import Family

#: Settings other than these defaults run the whole model on one device (a backward pass, or
#: every layer's curves): placement ``resident`` and one GPU.
WHOLE_MODEL: dict[str, Any] = {"allocation": "schedule", "selection": "output"}
#: Settings with no mixture-of-experts implementation.
DENSE_FFN_ONLY: dict[str, Any] = {"target": "layer", **WHOLE_MODEL}


def unavailable(settings: Mapping[str, Any], family: Family | None, *,
                placement: str | None = None, world_size: int = 1) -> str | None:
    """Why ``settings`` (``PruneConfig`` fields; missing ones at their defaults) cannot run
    on a model of ``family`` with ``placement`` on ``world_size`` GPUs, or None when they can
    (as far as they are known: ``family`` or ``placement`` None is not checked)."""
    if family is not None and family.layout.ffn == "experts":
        for name, default in DENSE_FFN_ONLY.items():
            value = settings.get(name, default)
            if value != default:
                return (f"{name} {value!r} is not implemented for mixture-of-experts models "
                        f"({family.name}); use {name} {default!r}")
    if settings.get("target", "layer") == "dense":
        if family is not None and (family.attn_out_norm is not None
                                   or family.ffn_out_norm is not None):
            return (f"target 'dense' needs each branch's output to join the residual stream "
                    f"linearly; {family.name} normalises it first")
        if placement == "stream":
            return ("target 'dense' needs the dense layers while pruning; it is not available "
                    "with the stream placement")
    for name, default in WHOLE_MODEL.items():
        value = settings.get(name, default)
        if value != default and ((placement is not None and placement != "resident")
                                 or world_size > 1):
            return (f"{name} {value!r} runs the whole model on one device: it needs the model "
                    "resident there (and one GPU)")
    return None
