"""A production-shaped stack for tests: the API on a private Postgres database, real Redis under
a private key prefix and queue, and real `slimgpt worker` processes started as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import redis
from cryptography.fernet import Fernet

from app.core.config import Settings

from .conftest import REDIS_URL

REPO_ROOT = Path(__file__).resolve().parents[2]


class Stack:
    def __init__(self, db_url: str, tmp: Path, models: Path) -> None:
        tag = uuid.uuid4().hex[:12]
        self.tmp = tmp
        self.prefix = f"slimgpt-e2e-{tag}:"
        self.settings = Settings(
            data_dir=tmp / "data", database_url=db_url, broker_url=REDIS_URL,
            broker_key_prefix=self.prefix, celery_queue=f"e2e-{tag}",
            artifacts_dir=tmp / "artifacts", local_models_dir=models, cache_dir=tmp / "cache",
            secret_key=Fernet.generate_key().decode(), job_lease_s=3,
            # A whole-worker crash is redelivered after the visibility timeout, so keep it short.
            job_soft_time_limit_s=75, job_hard_time_limit_s=80, visibility_timeout_s=81,
            unacked_restore_interval_s=0.5, auto_migrate=False,
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis = redis.Redis.from_url(REDIS_URL)

    def env(self, **extra: str) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update(
            SLIMGPT_DATA_DIR=str(s.data_dir), SLIMGPT_DATABASE_URL=str(s.database_url),
            SLIMGPT_BROKER_URL=str(s.broker_url), SLIMGPT_BROKER_KEY_PREFIX=s.broker_key_prefix,
            SLIMGPT_CELERY_QUEUE=s.celery_queue, SLIMGPT_ARTIFACTS_DIR=str(s.artifacts_dir),
            SLIMGPT_LOCAL_MODELS_DIR=str(s.local_models_dir), SLIMGPT_CACHE_DIR=str(s.cache_dir),
            SLIMGPT_SECRET_KEY=s.secret_key.get_secret_value(),  # type: ignore[union-attr]
            SLIMGPT_JOB_LEASE_S=str(s.job_lease_s),
            SLIMGPT_JOB_SOFT_TIME_LIMIT_S=str(s.job_soft_time_limit_s),
            SLIMGPT_JOB_HARD_TIME_LIMIT_S=str(s.job_hard_time_limit_s),
            SLIMGPT_VISIBILITY_TIMEOUT_S=str(s.visibility_timeout_s),
            SLIMGPT_UNACKED_RESTORE_INTERVAL_S=str(s.unacked_restore_interval_s),
            HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO_ROOT),
            OMP_NUM_THREADS="1",
        )
        env.pop("SLIMGPT_RUNNER", None)
        env.pop("SLIMGPT_QUEUE", None)
        env.update(extra)
        return env

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--hostname", f"{name}@{self.prefix}"],
            cwd=REPO_ROOT, env=self.env(**env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill9(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool child (its process group), like an OOM kill."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def broker_idle(self) -> bool:
        """Nothing queued or unacknowledged under this stack's prefix."""
        return (self.redis.llen(f"{self.prefix}{self.settings.celery_queue}") == 0
                and self.redis.hlen(f"{self.prefix}unacked") == 0)

    def close(self) -> None:
        self.stop_all()
        for key in self.redis.scan_iter(match=f"{self.prefix}*", count=500):
            self.redis.delete(key)
        self.redis.close()


def job_state(client: Any, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def events(client: Any, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/jobs/{job_id}/events", headers={**headers, "accept": "application/json"})
    assert r.status_code == 200, r.text
    return list(r.json())
