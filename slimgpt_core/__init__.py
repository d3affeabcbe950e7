"""SlimGPT structured pruning of decoder-only causal LMs (arXiv 2412.18110), one adapter per
model family (:mod:`slimgpt_core.families`).

Importing the package does not import torch: the API process uses :mod:`slimgpt_core.schedule`
for dry runs and must stay torch-free. The torch-backed entry points load on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PruneConfig": "slimgpt_core.pruner",
    "PruneResult": "slimgpt_core.pruner",
    "prune_model": "slimgpt_core.pruner",
    "ModelShape": "slimgpt_core.schedule",
    "make_plan": "slimgpt_core.schedule",
    "estimate": "slimgpt_core.schedule",
}

__all__ = [
    "ModelShape",
    "PruneConfig",
    "PruneResult",
    "__version__",
    "estimate",
    "make_plan",
    "prune_model",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slimgpt_core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
