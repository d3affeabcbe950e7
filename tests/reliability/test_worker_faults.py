"""Workers lost the ways they are lost in production: the whole process group SIGKILLed
mid-layer (OOM killer, lost host), SIGTERM (docker stop, scale-down), and a poison job that kills
its worker every time. The job's lease, not Redis's visibility timeout (left at its production
value of hours), brings the job back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import PrivateRedis, Stack, wait_until

from .conftest import Api, completions, event_time, layer_events, make_stack
from .fake_runner import expected_digest

pytestmark = pytest.mark.timeout(180)
LAYERS = 6
SLOW = {"SLIMGPT_TEST_FAKE_LAYERS": str(LAYERS), "SLIMGPT_TEST_LAYER_DELAY_S": "1"}


@pytest.fixture
def stack(pg_url: str, tmp_path: Path, redis_server: PrivateRedis,
          request: pytest.FixtureRequest) -> Iterator[Stack]:
    overrides = getattr(request, "param", {})
    s = make_stack(pg_url, tmp_path, redis_server.url, **overrides)
    try:
        yield s
    finally:
        s.close()


def _holder(api: Api, stack: Stack, job_id: str) -> str:
    """The name of the worker process whose pool child claimed the job last."""
    claims = [e["message"] for e in api.events(job_id) if "claimed by worker" in e["message"]]
    child_pid = int(claims[-1].split("claimed by worker ")[1].split()[0].split(":")[1])
    stat = Path(f"/proc/{child_pid}/stat").read_text()
    parent_pid = int(stat.rsplit(")", 1)[1].split()[1])
    return next(name for name, p in stack.procs.items() if p.pid == parent_pid)


def _start_two_workers(stack: Stack) -> None:
    for name in ("w1", "w2"):
        stack.start_worker(name, **SLOW)
    for name in ("w1", "w2"):
        stack.wait_worker_ready(name)


def _check_resumed_result(api: Api, stack: Stack, job_id: str, job: dict) -> None:
    assert job["state"] == "succeeded", (job["error"], stack.logs())
    assert job["result"]["digest"] == expected_digest(job_id, LAYERS)  # = an uninterrupted run
    rows = api.events(job_id)
    assert layer_events(rows) == list(range(LAYERS))  # every layer once: no gaps, no repeats
    assert [e["seq"] for e in rows] == list(range(1, len(rows) + 1))
    assert completions(stack, at_least=1) == [job_id]


def test_a_worker_killed_mid_layer_is_replaced_within_lease_plus_sweep_with_the_same_result(
        stack: Stack) -> None:
    s = stack.settings
    assert s.visibility_timeout_s >= 6 * 3600  # Redis would take hours; the lease takes seconds
    api = Api(stack.start_api("api"), stack.api_key())
    _start_two_workers(stack)
    job_id = api.submit()
    wait_until(lambda: 1 in layer_events(api.events(job_id)), 60, "layer 1 to finish",
               stack.logs, interval=0.05)
    doomed = _holder(api, stack, job_id)
    stack.kill9(doomed)  # inside layer 2: layers 0-1 are checkpointed, 2 is half done
    killed_at = time.time()

    job = api.wait_final([job_id], 60, stack)[job_id]
    _check_resumed_result(api, stack, job_id, job)
    assert job["attempts"] == 2 and job["metrics"]["resumed_from"] == 2
    rows = api.events(job_id)
    requeued = event_time(rows, "lost (lease expired)")
    reclaimed = [e for e in rows if "claimed by worker" in e["message"]][-1]
    from datetime import datetime

    resumed_after = datetime.fromisoformat(reclaimed["time"]).timestamp() - killed_at
    bound = s.job_lease_s + s.sweep_interval_s + s.retry_backoff_max_s
    assert requeued - killed_at <= s.job_lease_s + s.sweep_interval_s + 1.0
    assert resumed_after <= bound + 3.0  # + publishing and a fresh pool process
    print(f"\nFIGURE sigkill_worker lease_s={s.job_lease_s} sweep_s={s.sweep_interval_s} "
          f"requeued_after_s={requeued - killed_at:.2f} resumed_after_s={resumed_after:.2f} "
          f"lost=0 duplicated=0")
    api.close()


def test_sigterm_hands_the_job_back_at_the_next_layer_boundary_and_it_resumes_at_once(
        stack: Stack) -> None:
    api = Api(stack.start_api("api"), stack.api_key())
    _start_two_workers(stack)
    job_id = api.submit()
    wait_until(lambda: 1 in layer_events(api.events(job_id)), 60, "layer 1 to finish",
               stack.logs, interval=0.05)
    stopping = _holder(api, stack, job_id)
    stack.term(stopping)  # the main process only, as `docker stop` does
    termed_at = time.time()
    assert stack.procs[stopping].wait(timeout=20) == 0  # it exits once the job is handed back
    exited_after = time.time() - termed_at

    job = api.wait_final([job_id], 60, stack)[job_id]
    _check_resumed_result(api, stack, job_id, job)
    rows = api.events(job_id)
    handed_back = event_time(rows, "handed back by worker")
    reclaimed = [e for e in rows if "claimed by worker" in e["message"]][-1]
    from datetime import datetime

    resumed_after = datetime.fromisoformat(reclaimed["time"]).timestamp() - handed_back
    assert handed_back - termed_at <= 1.0 + 1.5  # the rest of the layer (1 s) + slack
    assert resumed_after <= 5.0  # published at once, no lease to wait out
    # Layer 2 was running: it is finished and checkpointed, then the job is handed back.
    assert job["attempts"] == 2 and job["metrics"]["resumed_from"] == 3
    assert "lost" not in " ".join(e["message"] for e in rows)  # not counted as a lost attempt
    print(f"\nFIGURE sigterm_worker handed_back_after_s={handed_back - termed_at:.2f} "
          f"worker_exited_after_s={exited_after:.2f} resumed_after_s={resumed_after:.2f}")
    api.close()


@pytest.mark.parametrize("stack", [{"job_lease_s": 60}], indirect=True)
def test_a_poison_job_fails_after_its_attempts_with_a_clear_error_and_frees_the_worker(
        stack: Stack) -> None:
    api = Api(stack.start_api("api"), stack.api_key())
    stack.start_worker("w1", SLIMGPT_TEST_FAKE_LAYERS="2")
    stack.wait_worker_ready("w1")
    t0 = time.monotonic()
    poison = api.submit("test/poison")
    job = api.wait_final([poison], 50, stack)[poison]
    failed_after = time.monotonic() - t0
    assert job["state"] == "failed"
    attempts = stack.settings.job_max_attempts
    assert job["error"].startswith(f"worker lost {attempts} times; last during loading on host ")
    assert "died" in job["error"] and job["attempts"] == attempts
    assert failed_after < stack.settings.job_lease_s  # no lease was waited out
    ok = api.submit()
    assert api.wait_final([ok], 30, stack)[ok]["state"] == "succeeded"
    print(f"\nFIGURE poison_job attempts={attempts} failed_after_s={failed_after:.2f} "
          f"lease_s={stack.settings.job_lease_s}")
    api.close()
