"""worker.fleet: a worker's row in the ``workers`` table (register, heartbeat, current job,
stop), GPU description through nvidia-smi, and per-job GPU figures."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from app.core.config import Settings
from app.crud import jobs as crud
from app.crud.workers import register_worker
from app.db.migrate import upgrade
from app.db.models import Job, Tenant, Worker
from app.db.session import session_scope
from worker import fleet


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path, secret_key=Fernet.generate_key().decode(),
                 worker_heartbeat_s=0.05)
    upgrade(str(s.database_url))
    return s


def _row(settings: Settings, worker_id: str) -> Worker | None:
    with session_scope(settings) as s:
        row = s.get(Worker, worker_id)
        if row is not None:
            s.expunge(row)
        return row


def _job(settings: Settings) -> str:
    with session_scope(settings) as s:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:8]}")
        s.add(tenant)
        s.flush()
        job = Job(tenant_id=tenant.id, model_id="a/b", request={"target_ratio": 0.2})
        s.add(job)
        s.flush()
        return job.id


def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_heartbeat_registers_beats_and_marks_the_stop(settings):
    hb = fleet.Heartbeat(settings, kind="celery", worker_id="gpu0@host", queue="q").start()
    try:
        row = _row(settings, "gpu0@host")
        assert row is not None and row.kind == "celery" and row.queue == "q"
        assert row.build["python"] and row.build["slimgpt_service"]
        first = row.last_heartbeat_at
        _wait(lambda: _row(settings, "gpu0@host").last_heartbeat_at > first)
    finally:
        hb.stop()
    row = _row(settings, "gpu0@host")
    assert row.stopped_at is not None and row.current_job_id is None


def test_a_worker_whose_row_vanished_registers_again(settings):
    hb = fleet.Heartbeat(settings, kind="embedded").start()
    try:
        with session_scope(settings) as s:
            s.delete(s.get(Worker, hb.worker_id))
        _wait(lambda: _row(settings, hb.worker_id) is not None)
    finally:
        hb.stop()


def test_the_current_job_is_shown_until_the_heartbeat_sees_it_ended(settings):
    job_id = _job(settings)
    hb = fleet.Heartbeat(settings, kind="embedded").start()
    try:
        fleet.starting(settings, hb.worker_id, job_id)
        row = _row(settings, hb.worker_id)
        assert row.current_job_id == job_id and row.current_job_since is not None
        with session_scope(settings) as s:
            crud.claim_job(s, job_id, "w", 60)
        time.sleep(0.2)  # several beats while the job runs: still its job
        assert _row(settings, hb.worker_id).current_job_id == job_id
        with session_scope(settings) as s:
            crud.finish_job(s, job_id, "succeeded")
        _wait(lambda: _row(settings, hb.worker_id).current_job_id is None)
        assert _row(settings, hb.worker_id).jobs_done == 1
    finally:
        hb.stop()


def test_starting_a_new_job_counts_the_previous_one(settings):
    first, second = _job(settings), _job(settings)
    with session_scope(settings) as s:
        register_worker(s, fleet.worker_info("w@h", "celery", None))
    fleet.starting(settings, "w@h", first)
    with session_scope(settings) as s:
        crud.finish_job(s, first, "succeeded")
    fleet.starting(settings, "w@h", second)
    row = _row(settings, "w@h")
    assert row.current_job_id == second and row.jobs_done == 1


def test_the_job_runs_even_when_the_fleet_table_is_unreachable(tmp_path):
    broken = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:1/x")
    fleet.starting(broken, "w", "job")  # logs, never raises
    hb = fleet.Heartbeat(broken, kind="embedded").start()  # logs, keeps trying, never raises
    hb.stop()


def test_a_deleted_job_frees_the_worker_row(settings):
    job_id = _job(settings)
    hb = fleet.Heartbeat(settings, kind="embedded").start()
    try:
        fleet.starting(settings, hb.worker_id, job_id)
        with session_scope(settings) as s:
            s.delete(s.get(Job, job_id))
        assert _row(settings, hb.worker_id).current_job_id is None  # ON DELETE SET NULL
    finally:
        hb.stop()


def test_gpus_are_described_by_nvidia_smi_honouring_cuda_visible_devices(monkeypatch):
    out = ("0, NVIDIA H200, 143771\n1, NVIDIA H200, 143771\n2, NVIDIA H200, 143771\n")
    monkeypatch.setattr(fleet.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(fleet.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout=out, stderr=""))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert fleet.describe_gpus() == ("NVIDIA H200", 3, 143771 * 1024 * 1024)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert fleet.describe_gpus()[1] == 2


def test_no_nvidia_smi_means_no_gpu(monkeypatch):
    monkeypatch.setattr(fleet.shutil, "which", lambda name: None)
    assert fleet.describe_gpus() == (None, 0, None)


def test_gpu_figures_are_read_only_where_cuda_already_runs(monkeypatch):
    class FakeCuda:
        def is_available(self) -> bool:
            return True

        def is_initialized(self) -> bool:
            return True

        def device_count(self) -> int:
            return 2

        def max_memory_allocated(self, device: int) -> int:
            return [3, 7][device] * 1024**3

        def reset_peak_memory_stats(self, device: int) -> None:
            self.reset = True

    class FakeTorch:
        cuda = FakeCuda()

    monkeypatch.setitem(fleet.sys.modules, "torch", FakeTorch)
    assert fleet.gpu_figures() == {"peak_gpu_memory_bytes": 7 * 1024**3}
    fleet.reset_gpu_peak()
    assert FakeTorch.cuda.reset
    monkeypatch.setattr(FakeCuda, "is_initialized", lambda self: False)
    assert fleet.gpu_figures() == {}


def test_the_runner_reports_peak_gpu_memory_with_the_result(monkeypatch, settings):
    """The runner merges fleet.gpu_figures() into the final metrics of every outcome."""
    job_id = _job(settings)
    monkeypatch.setattr(fleet, "gpu_figures", lambda: {"peak_gpu_memory_bytes": 123})
    from worker.runner import JobRunner, as_worker_settings

    runner = JobRunner(as_worker_settings(settings))

    def boom(*a, **k):
        raise RuntimeError("model exploded")

    monkeypatch.setattr(JobRunner, "_pipeline", boom)
    runner.run(job_id)
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        assert job.state == "failed" and job.metrics["peak_gpu_memory_bytes"] == 123
