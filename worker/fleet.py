"""A worker's presence in the ``workers`` table: register, heartbeat, current job, stop.

Every worker process (a Celery worker node, or the embedded in-process worker of an API) runs
one :class:`Heartbeat`; the dashboard's fleet page and the Prometheus metrics read the rows, so a
worker never needs its own metrics endpoint (see README, "Metrics").

This module must not import torch: the Celery parent process forks a child per job and must not
hold a CUDA context. GPUs are described with ``nvidia-smi``; a job's peak GPU memory is read in
the process that ran it, only when torch is already loaded there.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from importlib import metadata
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.crud import workers as crud
from app.db.session import make_engine

log = logging.getLogger("slimgpt.fleet")

#: The Celery node's worker id, set in the parent before the pool forks, inherited by children.
_process_worker_id: str | None = None

_BUILD_PACKAGES = ("slimgpt-service", "torch", "transformers", "celery")


def set_process_worker_id(worker_id: str | None) -> None:
    global _process_worker_id
    _process_worker_id = worker_id


def process_worker_id() -> str | None:
    return _process_worker_id


# -- what the process is ------------------------------------------------------------------------
def build_info() -> dict[str, Any]:
    """Versions this process runs (read from package metadata: nothing heavy is imported)."""
    info: dict[str, Any] = {"python": platform.python_version()}
    for name in _BUILD_PACKAGES:
        try:
            info[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if "slimgpt_service" not in info:
        from app import __version__

        info["slimgpt_service"] = __version__
    return info


def describe_gpus() -> tuple[str | None, int, int | None]:
    """(name, count, memory bytes per GPU) of the GPUs this process may use, via nvidia-smi
    (honouring CUDA_VISIBLE_DEVICES given as indices); (None, 0, None) without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, 0, None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        log.warning("nvidia-smi failed; reporting no GPU", exc_info=True)
        return None, 0, None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = {v.strip() for v in visible.split(",") if v.strip()}
        if all(v.isdigit() for v in wanted):
            rows = [r for r in rows if r and r[0] in wanted]
    if not rows:
        return None, 0, None
    names = sorted({r[1] for r in rows if len(r) > 1})
    try:
        memory = int(float(rows[0][2]) * 1024 * 1024)  # MiB
    except (IndexError, ValueError):
        memory = None
    return " + ".join(names) or None, len(rows), memory


def worker_info(worker_id: str, kind: str, queue: str | None) -> crud.WorkerInfo:
    name, count, memory = describe_gpus()
    return crud.WorkerInfo(id=worker_id, kind=kind, host=socket.gethostname(), pid=os.getpid(),
                           queue=queue, gpu_name=name, gpu_count=count, gpu_memory_bytes=memory,
                           build=build_info())


def default_worker_id(kind: str) -> str:
    return f"{kind}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:4]}"


# -- database access ----------------------------------------------------------------------------
_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A Celery child may be forked while the parent's heartbeat thread holds the lock.
    global _engines_lock
    _engines_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _sessions(settings: Settings) -> sessionmaker[Session]:
    """A session factory private to this process. NullPool: a Celery child forked from the parent
    must never reuse a connection the parent opened, and a beat every few seconds needs no pool."""
    key = (os.getpid(), str(settings.database_url))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(str(settings.database_url), null_pool=True)
    return sessionmaker(bind=engine, expire_on_commit=False)


# -- the heartbeat ------------------------------------------------------------------------------
class Heartbeat:
    """Registers the worker, then refreshes ``last_heartbeat_at`` every
    ``settings.worker_heartbeat_s`` on a daemon thread until :meth:`stop`."""

    def __init__(self, settings: Settings, *, kind: str, worker_id: str | None = None,
                 queue: str | None = None) -> None:
        self.settings = settings
        self.kind = kind
        self.worker_id = worker_id or default_worker_id(kind)
        self.queue = queue
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._info: crud.WorkerInfo | None = None

    def start(self) -> Heartbeat:
        self._info = worker_info(self.worker_id, self.kind, self.queue)
        try:
            self._register()
        except Exception:
            log.warning("could not register worker %s; will retry", self.worker_id, exc_info=True)
        self._thread = threading.Thread(target=self._loop, name="slimgpt-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _register(self) -> None:
        assert self._info is not None
        with _sessions(self.settings)() as s:
            crud.register_worker(s, self._info)
            crud.forget_old_workers(s)
        log.info("worker %s registered (%s, %d GPU)", self.worker_id,
                 self._info.gpu_name or "no GPU", self._info.gpu_count)

    def beat(self) -> None:
        with _sessions(self.settings)() as s:
            if not crud.heartbeat(s, self.worker_id,
                                  grace_s=max(30.0, 2 * self.settings.worker_heartbeat_s)):
                self._register()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_s):
            try:
                self.beat()
            except Exception:
                log.warning("heartbeat of %s failed", self.worker_id, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with _sessions(self.settings)() as s:
                crud.mark_stopped(s, self.worker_id)
        except Exception:
            log.warning("could not mark %s stopped", self.worker_id, exc_info=True)


def starting(settings: Settings, worker_id: str | None, job_id: str) -> None:
    """Record ``job_id`` as the worker's current job. Nothing is written when the job ends:
    the heartbeat lets go of a job whose row is terminal, so the job process finishes (and
    Celery acknowledges its message) right after the job's own final write. Never raises
    because of the fleet table: the job matters more than the dashboard."""
    if worker_id is None:
        return
    try:
        with _sessions(settings)() as s:
            crud.set_current_job(s, worker_id, job_id)
    except Exception:
        log.warning("could not record the current job of %s", worker_id, exc_info=True)


# -- per-job figures ----------------------------------------------------------------------------
def _cuda() -> Any | None:
    """torch.cuda when torch is already imported and CUDA is initialized, else None (never
    imports torch or starts CUDA just to measure)."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            return cuda
    except Exception:  # noqa: BLE001
        return None
    return None


def reset_gpu_peak() -> None:
    """Start a job's peak-memory window (the embedded worker runs several jobs in one process)."""
    cuda = _cuda()
    if cuda is not None:
        for device in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(device)


def gpu_figures() -> dict[str, Any]:
    """``peak_gpu_memory_bytes``: the largest peak allocated on any one GPU since the last
    :func:`reset_gpu_peak` (empty when the job used no GPU)."""
    cuda = _cuda()
    if cuda is None:
        return {}
    peaks = [int(cuda.max_memory_allocated(d)) for d in range(cuda.device_count())]
    return {"peak_gpu_memory_bytes": max(peaks)} if peaks else {}
