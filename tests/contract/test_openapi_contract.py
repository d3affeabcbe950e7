"""The API keeps its OpenAPI contract: schemathesis generates requests from /openapi.json (valid
and invalid ones, a few per operation, and chains of calls along the document's links) and
runs every check on the answers (status codes, content types, response schemas and headers,
the problem+json error shape, auth, allowed methods, ...). Per-operation exceptions, with
their reasons, are in schemathesis.toml; the same command without the example bound is the
full run (README, "API contract")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Bounded: a few examples per operation and phase, a fixed seed, so CI stays short. The full
#: run: SLIMGPT_CONTRACT_MAX_EXAMPLES=100 (schemathesis's default).
MAX_EXAMPLES = int(os.environ.get("SLIMGPT_CONTRACT_MAX_EXAMPLES", "4"))
PHASES = os.environ.get("SLIMGPT_CONTRACT_PHASES", "").split() or []


@pytest.mark.timeout(0)
def test_every_operation_keeps_the_contract(live_api) -> None:  # type: ignore[no-untyped-def]
    cli = Path(sys.executable).with_name("schemathesis")
    out = subprocess.run(
        [str(cli), "--config-file", str(ROOT / "schemathesis.toml"), "run",
         f"{live_api.url}/openapi.json", "--checks", "all",
         "-H", f"Authorization: Bearer {live_api.key}",
         "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--no-shrink", "--no-color",
         "--generation-database", "none", "--warnings", "off", *PHASES],
        cwd=ROOT, capture_output=True, text=True, timeout=max(380, 60 * MAX_EXAMPLES),
        check=False,
        env={**os.environ, "NO_COLOR": "1"})
    summary = out.stdout[-6000:]
    print(summary)
    assert out.returncode == 0, summary
