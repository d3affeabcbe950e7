"""Named bundles of pruning settings, for the job API and the CLI: a user picks what matters
to them (the paper's method at its speed, or the best model measured) instead of five expert
options. Torch-free, so the API can validate requests with it.

``standard`` is :class:`~slimgpt_core.pruner.PruneConfig`'s defaults: SlimGPT as published
with the pieces measured at least as good (docs/BENCHMARKS.md, issue 15), for every model,
placement and GPU count. ``quality`` adds what measured best at equal size on SmolLM2-135M:
Fisher selection with labels drawn from the model (8 per token), the dense model's stream as
the compensation target, and per-layer widths from measured sensitivity -- 1.132x / 1.729x
dense perplexity at 20% / 50% against the standard 1.196x / 2.173x, for ~15x its pruning time
on that model. It needs the model resident on one GPU (backward passes) and a family whose
branches join the residual stream linearly, and it is not implemented for mixtures of
experts: :func:`slimgpt_core.availability.unavailable` says which. ``thorough`` refines
``quality``'s per-layer widths by search on the whole model's divergence from the dense one,
the best few allocations pruned for real: 1.699x dense perplexity at 50% (mean of eight
calibration seeds) for ~5x ``quality``'s time; it keeps every layer's pruned weights at many
widths on the GPU, so where they do not fit (an 8B model on one H200) it is refused before
calibrating.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_QUALITY: dict[str, Any] = {"selection": "fisher", "fisher_samples": 8, "target": "dense",
                            "allocation": "sensitivity"}
PRESETS: dict[str, dict[str, Any]] = {
    "standard": {},
    "quality": _QUALITY,
    "thorough": {**_QUALITY, "allocation": "search"},
}
DEFAULT_PRESET = "standard"
#: What a dry-run estimate (``/v1/estimate``, ``slimgpt prune --dry-run``) does not show of a
#: preset: its plan and time model are the standard method's.
ESTIMATE_NOTES: dict[str, str] = {
    "quality": ("preset 'quality': the per-layer widths are chosen by measured sensitivity "
                "while pruning (the totals hold); the predicted times are the standard "
                "method's -- this preset took ~15x that time on SmolLM2-135M "
                "(docs/BENCHMARKS.md); it runs only where the placement is `resident`, on "
                "one GPU"),
    "thorough": ("preset 'thorough': the per-layer widths are chosen by measured sensitivity, "
                 "then refined by search while pruning (the totals hold); the predicted times "
                 "are the standard method's -- this preset took ~5x the 'quality' preset's "
                 "time on SmolLM2-135M (docs/BENCHMARKS.md); it runs only where the placement "
                 "is `resident`, on one GPU with room for every layer's weights at many widths "
                 "(not an 8B model on one H200)"),
}


def estimate_notes(name: str) -> list[str]:
    """What a dry-run estimate does not show of preset ``name``."""
    return [ESTIMATE_NOTES[name]] if name in ESTIMATE_NOTES else []


def preset_settings(name: str) -> dict[str, Any]:
    """The ``PruneConfig`` settings of preset ``name`` (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def preset_named(changed: Mapping[str, Any]) -> str | None:
    """The preset whose settings are exactly ``changed`` (the settings that differ from the
    library's defaults, among those a preset sets), or None."""
    for name, settings in PRESETS.items():
        if dict(changed) == settings:
            return name
    return None
