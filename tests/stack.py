"""Production-shaped stacks for tests, from real processes: the API and `slimgpt worker`s as
subprocesses (each in its own process group, so a test can SIGKILL a whole worker as the OOM
killer or a lost host would), on a Postgres database and Redis.

Tests that restart, kill or SIGSTOP Redis start their own :class:`PrivateRedis` (a
``redis-server`` on a free port in a temp dir); the shared servers are never touched. Other
stacks share the test Redis under a private key prefix and queue.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from cryptography.fernet import Fernet
from pydantic import SecretStr

from app.core.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_REDIS_URL = os.environ.get("SLIMGPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               on_timeout: Callable[[], str] | None = None, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    detail = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail}")


class PrivateRedis:
    """A redis-server of this test only: restart, kill or pause it freely."""

    def __init__(self, tmp: Path, *, appendonly: bool = False) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.dir = tmp / f"redis-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.dir), "--save", "", "--appendonly", "yes" if self.appendonly else "no",
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = self.client()
        try:
            wait_until(lambda: self._pings(client), 15, "the private redis-server")
        finally:
            client.close()
        return self

    @staticmethod
    def _pings(client: Any) -> bool:
        try:
            return bool(client.ping())
        except Exception:  # noqa: BLE001
            return False

    def stop(self) -> None:
        """A clean shutdown (what `docker restart redis` does)."""
        self.resume()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused and self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False

    def close(self) -> None:
        self.resume()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _env_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Stack:
    """Settings shared by the test and its subprocesses, and the subprocesses themselves."""

    def __init__(self, db_url: str, tmp: Path, *, redis_url: str = SHARED_REDIS_URL,
                 **overrides: Any) -> None:
        tag = uuid.uuid4().hex[:10]
        self.tmp = tmp
        self.tag = tag
        values: dict[str, Any] = {
            "data_dir": tmp / "data", "database_url": db_url, "broker_url": redis_url,
            "broker_key_prefix": f"slimgpt-test-{tag}:", "celery_queue": f"q-{tag}",
            "artifacts_dir": tmp / "artifacts", "local_models_dir": tmp / "models",
            "uploads_dir": tmp / "uploads", "cache_dir": tmp / "cache",
            "secret_key": Fernet.generate_key().decode(), "auto_migrate": False,
            # Recovery in seconds instead of minutes; the visibility timeout stays as in
            # production (hours): recovery must not depend on it.
            "job_lease_s": 3, "sweep_interval_s": 0.5, "retry_backoff_base_s": 0.5,
            "retry_backoff_max_s": 1.0, "leader_lease_s": 3,
            # Fault tests measure recovery; the per-tenant limits have tests of their own.
            "rate_limit_per_minute": 0, "max_queued_jobs_per_tenant": 0,
        }
        values.update(overrides)
        self.settings = Settings(**values)
        for d in ("data_dir", "artifacts_dir", "local_models_dir", "uploads_dir"):
            Path(getattr(self.settings, d)).mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.extra_env: dict[str, str] = {}

    # -- environment -------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMGPT_")}
        for name, value in self.settings.model_dump().items():
            text = _env_value(value)
            if text is not None:
                env[f"SLIMGPT_{name.upper()}"] = text
        env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO_ROOT),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        env.update(extra)
        return env

    # -- processes ---------------------------------------------------------------------------
    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=self.env(**env),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        return self.start(name, ["-m", "app.cli", "worker", "--hostname",
                                 f"{name}@{self.tag}"], **env)

    def wait_worker_ready(self, name: str, timeout: float = 60) -> None:
        wait_until(lambda: " ready." in self.log(name), timeout, f"worker {name} to start",
                   self.logs)

    def start_api(self, name: str, **env: str) -> str:
        """`slimgpt serve` on a free port; returns its base URL once /healthz answers."""
        port = free_port()
        self.start(name, ["-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                   **env)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited\n{self.logs()}")
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, f"{name} to answer", self.logs)
        return url

    def kill9(self, name: str) -> None:
        """SIGKILL the process and its children (its process group): an OOM kill, a lost host."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def freeze(self, name: str) -> None:
        """SIGSTOP the process group: a long GC or VM pause; its connections stay open."""
        os.killpg(self.procs[name].pid, signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGCONT)

    def term(self, name: str) -> None:
        """SIGTERM to the main process only, as `docker stop` sends it."""
        os.kill(self.procs[name].pid, signal.SIGTERM)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)  # a frozen one could not stop
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    # -- data --------------------------------------------------------------------------------
    def api_key(self, tenant: str = "reliability") -> str:
        from app.crud.tenants import create_api_key
        from app.db.session import session_scope

        with session_scope(self.settings) as session:
            _, key = create_api_key(session, f"{tenant}-{uuid.uuid4().hex[:6]}")
        return key

    def redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(str(self.settings.broker_url), socket_timeout=2)

    def queue_key(self) -> str:
        return f"{self.settings.broker_key_prefix}{self.settings.celery_queue}"

    def close(self) -> None:
        self.stop_all()
        if str(self.settings.broker_url) == SHARED_REDIS_URL:
            client = self.redis_client()
            try:
                for key in client.scan_iter(match=f"{self.settings.broker_key_prefix}*",
                                            count=500):
                    client.delete(key)
            finally:
                client.close()


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


class PrivatePostgres:
    """A PostgreSQL server of this test only (initdb + pg_ctl on a free port in a temp dir):
    stop, start and kill it freely; the shared server on 5432 is never touched.

    As root (CI, the dev machines) the server runs as the ``postgres`` user, which initdb
    requires; its data directory is a fresh temp dir owned by that user.
    """

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
        if self.initdb is None or self.pg_ctl is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="slimgpt-pg-"))
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError as err:
                raise RuntimeError("running as root and there is no `postgres` user") from err
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run([self.initdb, "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--no-sync", "--no-instructions"])

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.decode(errors='replace')}")

    def start(self) -> PrivatePostgres:
        self._run([str(self.pg_ctl), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"),
                   "-w", "-t", "30", "-o", (f"-p {self.port} -k {self.dir} -c fsync=off "
                   "-c listen_addresses=127.0.0.1 -c max_connections=200"), "start"])
        return self

    def stop(self, mode: str = "fast") -> None:
        """``fast``: what a clean restart or failover does (connections are closed);
        ``immediate``: a crash."""
        self._run([str(self.pg_ctl), "-D", str(self.dir / "data"), "-m", mode, "-w", "stop"])

    def running(self) -> bool:
        return (self.dir / "data" / "postmaster.pid").exists()

    def close(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
