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
