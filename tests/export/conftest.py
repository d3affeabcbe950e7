"""Fixtures of the export tests: tiny models built from configs, pruned once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for p in (ROOT, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _export_helpers import export, make_pruned


@pytest.fixture(scope="session")
def pruned():
    """Cache of (case, schedule) -> (PruneResult, calibration ids)."""
    cache: dict = {}

    def get(case: str, schedule: str = "log"):
        if (case, schedule) not in cache:
            cache[case, schedule] = make_pruned(case, schedule)
        return cache[case, schedule]

    return get


@pytest.fixture(scope="session")
def exported(pruned, tmp_path_factory):
    """Cache of (case, profile) -> (PruneResult, folder): unverified exports (the verification
    tests run the fresh-process check themselves)."""
    cache: dict = {}

    def get(case: str, profile: str = "hetero"):
        key = (case, profile)
        if key not in cache:
            schedule = "uniform" if profile == "uniform" else "log"
            result, ids = pruned(case, schedule)
            folder = tmp_path_factory.mktemp(f"{case}-{profile}") / "model"
            export(result, ids, folder, profile=profile)
            cache[key] = (result, folder)
        return cache[key]

    return get


