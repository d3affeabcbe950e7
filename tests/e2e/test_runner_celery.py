"""Real `slimgpt worker` processes on real Redis and a real Postgres database, with the real
pipeline on tiny models: happy path, SIGKILL mid-layer resumed by another worker through the
lease (Redis's visibility timeout left at hours), cancel."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from app.db.migrate import upgrade
from app.dispatch import CeleryPublisher
from app.dispatcher import Dispatcher
from app.main import create_app
from tests.stack import Stack

from .conftest import TempPostgres, job_body, upload_calibration, wait_until

pytestmark = pytest.mark.timeout(240)
PHASES = ["loading", "calibrating", "pruning", "verifying", "evaluating", "publishing"]
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def stack(pg_admin: str, tiny_models: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    db = TempPostgres(pg_admin, prefix="slimgpt_e2e")
    s = Stack(db.url, tmp_path_factory.mktemp("stack"), local_models_dir=tiny_models)
    try:
        upgrade(db.url)
        app = create_app(s.settings)
        assert isinstance(app.state.dispatcher, Dispatcher)
        from app.crud.tenants import create_api_key
        from app.db.session import session_scope

        with session_scope(s.settings) as session:
            _, key = create_api_key(session, "e2e")
        with TestClient(app) as client:
            headers = {"Authorization": f"Bearer {key}"}
            file_id = upload_calibration(client, headers)
            yield {"stack": s, "client": client, "headers": headers, "file_id": file_id,
                   "reference": {}}
    finally:
        s.close()
        db.close()


def job_state(client: Any, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def events(client: Any, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/jobs/{job_id}/events", headers={**headers, "accept": "application/json"})
    assert r.status_code == 200, r.text
    return list(r.json())


def broker_idle(s: Stack) -> bool:
    """Nothing queued and nothing unacknowledged under this stack's prefix."""
    r = s.redis_client()
    try:
        return (r.llen(s.queue_key()) == 0
                and r.hlen(f"{s.settings.broker_key_prefix}unacked") == 0)
    finally:
        r.close()


def _submit(ctx: dict[str, Any], model: str) -> str:
    r = ctx["client"].post("/v1/jobs", json=job_body(model, ctx["file_id"]),
                           headers=ctx["headers"])
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _wait_terminal(ctx: dict[str, Any], job_id: str, timeout: float = 150) -> dict[str, Any]:
    s: Stack = ctx["stack"]

    def done() -> dict[str, Any] | None:
        job = job_state(ctx["client"], ctx["headers"], job_id)
        return job if job["state"] in TERMINAL else None

    return dict(wait_until(done, timeout, f"job {job_id} to finish", s.logs))


def _weights(ctx: dict[str, Any], job_id: str) -> dict[str, Any]:
    folder = Path(ctx["stack"].settings.artifacts_dir) / job_id / "model"
    tensors: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _layer_events(rows: list[dict[str, Any]]) -> list[int]:
    return [e["layer"] for e in rows if (e["metrics"] or {}).get("kind") == "layer_done"]


def test_runner_celery_job_runs_queued_to_succeeded_with_events_in_order(
        stack: dict[str, Any]) -> None:
    s: Stack = stack["stack"]
    job_id = _submit(stack, "tiny6")
    assert job_state(stack["client"], stack["headers"], job_id)["state"] == "queued"
    s.start_worker("happy")
    job = _wait_terminal(stack, job_id)
    s.stop_all()
    assert job["state"] == "succeeded", (job["error"], s.logs())
    rows = events(stack["client"], stack["headers"], job_id)
    assert [e["seq"] for e in rows] == list(range(1, len(rows) + 1))
    states = [e["state"] for e in rows]
    assert states[0] == "queued" and states[-1] == "succeeded"
    assert set(states[1:-1]) == {"running"}
    phases = [e["phase"] for e in rows if e["phase"] in PHASES]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == PHASES
    assert _layer_events(rows) == list(range(6))
    assert job["attempts"] == 1 and job["metrics"]["resumed_from"] == 0
    wait_until(lambda: broker_idle(s), 20, "the message to be acknowledged", s.logs)
    stack["reference"]["weights"] = _weights(stack, job_id)


def test_runner_celery_kill9_mid_layer_resumes_on_another_worker_with_identical_result(
        stack: dict[str, Any]) -> None:
    if "weights" not in stack["reference"]:
        pytest.skip("needs the uninterrupted run of the previous test")
    s: Stack = stack["stack"]
    assert s.settings.visibility_timeout_s >= 6 * 3600  # production value: hours
    s.start_worker("doomed", SLIMGPT_TEST_LAYER_DELAY_S="4")
    job_id = _submit(stack, "tiny6")

    def done_layers() -> list[int]:
        return _layer_events(events(stack["client"], stack["headers"], job_id))

    wait_until(lambda: done_layers(), 120, "the first layer to finish", s.logs)
    s.start_worker("rescuer")  # idle: the only message went to "doomed"
    s.wait_worker_ready("rescuer", 90)
    # Each layer sleeps 4 s after it started and before anything of it is saved: kill right
    # after a layer finished, in the middle of the next one.
    seen = len(done_layers())
    assert seen < 5, "the job ran ahead of the test; the machine is too slow for it"
    wait_until(lambda: len(done_layers()) > seen, 60, "the next layer to finish", s.logs)
    s.kill9("doomed")  # the whole process group, mid-layer
    killed_at = time.time()
    k = len(done_layers())
    assert k < 6

    job = _wait_terminal(stack, job_id)
    s.stop_all()
    assert job["state"] == "succeeded", (job["error"], s.logs())
    assert job["metrics"]["resumed_from"] == k
    assert job["attempts"] == 2
    rows = events(stack["client"], stack["headers"], job_id)
    claim = [e for e in rows if "claimed by worker" in e["message"]][-1]
    resumed_after = datetime.fromisoformat(claim["time"]).timestamp() - killed_at
    settings = s.settings
    assert resumed_after <= (settings.job_lease_s + settings.sweep_interval_s
                             + settings.retry_backoff_max_s + 5)
    print(f"\nFIGURE sigkill_worker_real_pipeline resumed_from_layer={k} "
          f"resumed_after_s={resumed_after:.2f} weights_identical=True")
    resumed = [e for e in rows if (e["metrics"] or {}).get("kind") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["layer"] == k
    assert _layer_events(rows) == list(range(6))  # every layer once: no duplicates, no gaps
    assert [e["seq"] for e in rows] == list(range(1, len(rows) + 1))

    ref, got = stack["reference"]["weights"], _weights(stack, job_id)
    assert ref.keys() == got.keys()
    for name in ref:
        assert ref[name].equal(got[name]), name

    # Exactly one artifact set: the published model, no second copy, no leftovers.
    root = Path(s.settings.artifacts_dir) / job_id
    assert sorted(p.name for p in root.iterdir()) == ["model"]
    arts = stack["client"].get(f"/v1/jobs/{job_id}/artifacts", headers=stack["headers"]).json()
    names = [a["name"] for a in arts["items"]]
    assert len(names) == len(set(names)) == len([p for p in (root / "model").rglob("*")
                                                 if p.is_file()])


def test_runner_celery_cancel_during_pruning_cleans_up_and_redelivery_does_not_rerun(
        stack: dict[str, Any]) -> None:
    s: Stack = stack["stack"]
    job_id = _submit(stack, "tiny6")
    s.start_worker("cancel", SLIMGPT_TEST_LAYER_DELAY_S="2")
    ckpt = Path(s.settings.artifacts_dir) / job_id / "checkpoints"
    wait_until(lambda: 0 in _layer_events(events(stack["client"], stack["headers"], job_id)),
               90, "layer 0 to finish", s.logs)
    assert ckpt.is_dir()  # partial files exist while it runs
    r = stack["client"].post(f"/v1/jobs/{job_id}/cancel", headers=stack["headers"])
    assert r.status_code == 202
    job = _wait_terminal(stack, job_id, timeout=60)
    assert job["state"] == "cancelled", job
    assert len(_layer_events(events(stack["client"], stack["headers"], job_id))) < 6
    assert not (Path(s.settings.artifacts_dir) / job_id).exists()
    wait_until(lambda: s.redis_client().llen(s.queue_key()) == 0, 20,
               "the message to be consumed", s.logs)

    # Redeliver the job's message: the worker takes it, sees a terminal job and does nothing.
    before = events(stack["client"], stack["headers"], job_id)
    publisher = CeleryPublisher(s.settings)
    publisher.publish(job_id, s.settings.celery_queue)
    publisher.reset()
    wait_until(lambda: "not taken: the job is cancelled" in s.logs(), 60,
               "the redelivered message to be consumed", s.logs)
    s.stop_all()
    after = events(stack["client"], stack["headers"], job_id)
    assert after == before
    assert job_state(stack["client"], stack["headers"], job_id)["state"] == "cancelled"
    assert not (Path(s.settings.artifacts_dir) / job_id).exists()
