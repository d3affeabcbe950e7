"""A client generated from the OpenAPI document (openapi-python-client, into a temp dir) works
against the live API: it submits, lists and reads a job, with typed models all the way, and
gets the problem+json error model back for an unknown job."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CONFIG = ("project_name_override: slimgpt-api-client\n"
          "package_name_override: slimgpt_api_client\n"
          "post_hooks: []\n")


@pytest.fixture(scope="module")
def generated(live_api, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("generated")
    spec = root / "openapi.json"
    spec.write_bytes(httpx.get(f"{live_api.url}/openapi.json").content)
    (root / "config.yaml").write_text(CONFIG)
    cli = Path(sys.executable).with_name("openapi-python-client")
    out = subprocess.run([str(cli), "generate", "--path", str(spec), "--output-path",
                          str(root / "slimgpt_api_client"), "--meta", "none", "--config",
                          str(root / "config.yaml")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("slimgpt_api_client")
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.startswith("slimgpt_api_client")]:
            del sys.modules[name]


def test_generated_client_submits_lists_and_reads_a_job(generated, live_api):  # type: ignore[no-untyped-def]
    from slimgpt_api_client import AuthenticatedClient
    from slimgpt_api_client.api.jobs import create_job, get_job, list_jobs
    from slimgpt_api_client.models import JobCreate, JobList, JobOut, Problem

    client = AuthenticatedClient(base_url=live_api.url, token=live_api.key)
    body = JobCreate.from_dict({"model_id": "HuggingFaceTB/SmolLM2-135M", "target_ratio": 0.2,
                                "evaluate": {"eval_source": "c4", "num_windows": 8}})
    created = create_job.sync_detailed(client=client, body=body, idempotency_key="generated-1")
    assert created.status_code == 202 and isinstance(created.parsed, JobOut)
    job_id = created.parsed.id

    listing = list_jobs.sync(client=client, limit=50)
    assert isinstance(listing, JobList) and job_id in [j.id for j in listing.items]

    deadline = time.monotonic() + 30
    job = get_job.sync(job_id=job_id, client=client)
    while job.state.value not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job.state
        time.sleep(0.05)
        job = get_job.sync(job_id=job_id, client=client)
    assert isinstance(job, JobOut) and job.state.value == "failed"
    assert job.error_code == "hub_offline"  # the worker's code, typed
    assert job.metrics.seconds["loading"] == 0.1
    assert job.request["evaluate"]["eval_source"] == "c4"

    missing = get_job.sync_detailed(job_id="00000000-0000-0000-0000-000000000000",
                                    client=client)
    assert missing.status_code == 404 and isinstance(missing.parsed, Problem)
    assert missing.parsed.code == "not_found"
