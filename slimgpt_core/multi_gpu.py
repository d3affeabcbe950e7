"""Launching one pruning job over several GPUs of a host, torchrun-style.

The process that owns the job (the worker's task, or ``slimgpt prune``) is rank 0, the leader:
it reports progress, writes the pruned layers and exports. It starts ranks ``1..N-1`` as
``python -m slimgpt_core.multi_gpu <job.json>`` with torchrun's variables (``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); every rank streams the model from
the same safetensors folder (memory-mapped, so the page cache is shared and host memory does
not grow with the number of GPUs) and joins the process group; see
:mod:`slimgpt_core.collective` for what the ranks exchange.

A rank that dies must not leave the others waiting for it until the collective timeout. The
leader watches its helpers (:class:`RankWatch`): when one exits abnormally it kills the
others, aborts its own process group (so a collective waiting for the dead rank returns) and
the job fails with :class:`~slimgpt_core.errors.RankFailed` naming the rank and how it ended,
within about a second. Finished layers are already checkpointed, so the next attempt resumes
after them. A helper that exits with status 0 before it has finished its part of the job is a
failure too. A helper that is alive but hung (SIGSTOPped, stuck in a kernel) is found by its
heartbeat (:class:`Heartbeat`: a file it rewrites every half second with how many collectives
it has entered and finished): the watch fails the job when a helper's heartbeat stops, or when
it makes no progress outside a collective, for the *stall time*: the largest of
``stall_min_s`` (default ``SLIMGPT_RANK_STALL_S``, 120 s) and ``STALL_LAYERS`` (10) times the
longest layer the leader has measured in this job, so a slow layer is never taken for a hang.
A helper waiting inside a collective (for the leader's maths, or for a hung peer) is not stalled,
nor is one outside a collective (capturing inputs, replaying finished layers after a resume)
unless the leader has been waiting inside a collective for the stall time too.
A helper whose leader dies is killed by the kernel (``PR_SET_PDEATHSIG``) or, where
that is unavailable, exits when it notices that its parent has gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slimgpt_core.errors import RankFailed

logger = logging.getLogger(__name__)
#: Collectives that take longer than this fail the job instead of hanging it (the leader's
#: maths for one layer of a 70B model takes seconds; a dead rank is what this catches).
COLLECTIVE_TIMEOUT_S = 900.0
#: Floor of the stall time after which a live helper that makes no progress fails the job (the
#: watch uses at least ``STALL_LAYERS`` times the longest layer measured so far).
STALL_ENV = "SLIMGPT_RANK_STALL_S"
DEFAULT_STALL_S = 120.0
STALL_LAYERS = 10.0
#: How often a helper rewrites its heartbeat file.
BEAT_S = 0.5


def default_stall_s() -> float:
    return float(os.environ.get(STALL_ENV) or DEFAULT_STALL_S)


@dataclass
class RankJob:
    """What every rank needs to take part (written as JSON next to the job's files)."""

    model_dir: str
    calibration_file: str  # safetensors with "input_ids"
    config: dict[str, Any]  # PruneConfig fields
    dtype: str | None = None
    #: Each helper touches ``{ready_dir}/rank{r}.ready`` once it has everything it needs and
    #: is about to join the group, so the leader never waits on a rank that already failed.
    ready_dir: str | None = None
    #: ``"module:function"`` that opens the model as ``function(model_dir, dtype)`` (an object
    #: with ``.model`` and ``.source``); default :func:`~slimgpt_core.streaming.open_streamed`.
    #: Benchmarks use it for weights made on the fly.
    opener: str | None = None
    #: Folders put in front of ``sys.path`` before ``opener`` is imported.
    pythonpath: list[str] | None = None

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RankJob:
        return cls(**json.loads(Path(path).read_text()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            # Keep NVLink multicast off (the host's GPUs are shared; see the deployment notes).
            "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0"),
            "TORCH_SYMM_MEM_DISABLE_MULTICAST":
                os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
            "NVSHMEM_DISABLE_NVLS": os.environ.get("NVSHMEM_DISABLE_NVLS", "1")}

#: Tells a helper which process leads it (it exits when that process is gone).
LEADER_PID_ENV = "SLIMGPT_LEADER_PID"


def start_helpers(job_path: Path, world_size: int, port: int,
                  log_dir: Path | None = None) -> list[subprocess.Popen[bytes]]:
    """Start ranks ``1..world_size-1`` of the job described by ``job_path``."""
    procs = []
    for rank in range(1, world_size):
        env = dict(os.environ, **rank_env(rank, world_size, port))
        env[LEADER_PID_ENV] = str(os.getpid())
        out = (log_dir / f"rank{rank}.log").open("wb") if log_dir is not None else None
        # A session of their own: a signal meant for the worker's process group (Ctrl-C, a
        # SIGTERM to the group) reaches the leader, which stops at a layer boundary and stops
        # them; it must not kill them mid-collective, which would fail the job instead.
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "slimgpt_core.multi_gpu", str(job_path)],
            env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True))
    return procs


#: Held while the leader's process group is aborted or shut down (two threads may try).
_GROUP_LOCK = threading.Lock()


@contextmanager
def leader_group(world_size: int, port: int,
                 timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Iterator[Any]:
    """Join the job's process group as rank 0 (the caller's own process) for the block."""
    from slimgpt_core.collective import init_from_env, shutdown

    env = rank_env(0, world_size, port)
    # NCCL's default (3) kills a process whose collective failed or timed out; the leader is the
    # worker's own process and must live to report the job, so errors surface as exceptions
    # (2: abort the communicator, raise on the next wait) unless the deployment says otherwise.
    env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING",
                                                            "2")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        comm = init_from_env(timeout_s)
        yield comm
    finally:
        with _GROUP_LOCK:
            try:
                shutdown()
            except Exception:  # an aborted group (a rank died) may not shut down
                logger.debug("process group shutdown after an abort", exc_info=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: The name this module used before :class:`~slimgpt_core.errors.RankFailed` existed.
HelperFailed = RankFailed


def exit_cause(code: int) -> str:
    """How a process ended, from its ``Popen.returncode``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (also what the kernel's out-of-memory killer sends)" if -code == 9 else ""
        return f"was killed by {name}{hint}"
    if code == 0:
        return "exited with code 0 before the job ended"
    return f"exited with code {code}"


def _log_tail(rank: int, log_dir: Path | None) -> str:
    path = log_dir / f"rank{rank}.log" if log_dir is not None else None
    if path is None or not path.exists():
        return ""
    lines = path.read_text(errors="replace").strip().splitlines()
    return f"; its log {path} ends: " + " | ".join(lines[-3:]) if lines else ""


def rank_failure(rank: int, proc: subprocess.Popen[bytes], code: int,
                 log_dir: Path | None) -> RankFailed:
    cause = exit_cause(code)
    return RankFailed(f"helper rank {rank} (pid {proc.pid}) {cause}{_log_tail(rank, log_dir)}",
                      rank=rank, cause=cause)


def wait_ready(procs: list[subprocess.Popen[bytes]], ready_dir: Path, log_dir: Path | None,
               timeout_s: float = 600.0) -> None:
    """Wait until every helper is ready to join the group; raise as soon as one has died."""
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = [r for r in range(1, len(procs) + 1)
                   if not (ready_dir / f"rank{r}.ready").exists()]
        if not waiting:
            return
        for r in waiting:
            code = procs[r - 1].poll()
            if code is not None:
                raise rank_failure(r, procs[r - 1], code, log_dir)
        if time.monotonic() > deadline:
            raise RankFailed(f"helper ranks {waiting} were not ready after {timeout_s:.0f}s",
                             rank=waiting[0], cause="not ready")
        time.sleep(0.2)


def beat_path(work_dir: Path, rank: int) -> Path:
    return work_dir / f"rank{rank}.beat"


class Heartbeat:
    """A helper's sign of life for the leader's :class:`RankWatch`: ``rank{r}.beat`` holds
    ``beats entered done finished``, rewritten every ``BEAT_S`` by a thread (a frozen process
    stops beating) with the collectives this rank has entered and left (a rank stuck outside a
    collective stops progressing while its peers wait inside one). Without a ``path`` it only
    counts (the leader's own collectives, for its watch)."""

    COLLECTIVES = ("share", "reduce_sum_", "reduce_count", "broadcast_", "broadcast_object",
                   "barrier")

    def __init__(self, path: Path | None, interval_s: float = BEAT_S) -> None:
        self.path, self.interval_s = path, interval_s
        self.beats = self.entered = self.done = 0
        #: When this rank entered the collective it is in (None: outside one).
        self.inside_since: float | None = None
        self.finished = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slimgpt-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        if self.path is not None:
            self._write()
            self._thread.start()
        return self

    def _write(self) -> None:
        if self.path is None:
            return
        with self._lock:
            if self.finished and self._stop.is_set():
                return
            self.beats += 1
            tmp = self.path.with_suffix(".beat.tmp")
            tmp.write_text(f"{self.beats} {self.entered} {self.done} {int(self.finished)}\n")
            os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()

    @contextmanager
    def collective(self) -> Iterator[None]:
        self.inside_since = time.monotonic()
        self.entered += 1
        try:
            yield
        finally:
            self.done += 1
            self.inside_since = None

    def wrap(self, comm: Any) -> Any:
        """Count ``comm``'s collectives (the object's own methods are replaced)."""
        for name in self.COLLECTIVES:
            method = getattr(comm, name)

            def counted(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
                with self.collective():
                    return _method(*args, **kwargs)

            setattr(comm, name, counted)
        return comm

    def finish(self) -> None:
        """This rank's part of the job is done: an exit 0 from now on is expected."""
        self.finished = True
        self._write()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def read_beat(path: Path) -> tuple[int, int, int, bool] | None:
    try:
        beats, entered, done, finished = path.read_text().split()
        return int(beats), int(entered), int(done), finished == "1"
    except (OSError, ValueError):  # not written yet
        return None


def abort_group() -> None:
    """Abort this process's process group so a collective that waits for a dead rank
    returns (NCCL: ``ncclCommAbort``; gloo already fails once the peer's sockets close)."""
    import torch.distributed as dist

    with _GROUP_LOCK:
        if not dist.is_initialized():
            return
        try:
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        except Exception:  # older torch, or a backend without the call
            logger.debug("_abort_process_group failed; aborting the default group", exc_info=True)
            try:
                dist.distributed_c10d._get_default_group().abort()
            except Exception:  # best effort: the rank's death is what counts
                logger.warning("could not abort the process group", exc_info=True)


class RankWatch:
    """Watches the helper ranks while the leader works (a thread polling every ``poll_s``).

    When a helper exits with a non-zero status (an error, a signal, the OOM killer), exits
    with 0 before it has finished its part, or stalls (see the module docstring; only with
    ``beat_dir``; ``leader`` counts the leader's own collectives), the watch records a
    :class:`RankFailed` naming it, kills the helpers, and calls ``on_failure`` (the leader
    aborts its process group there). The leader then raises
    the recorded failure: from its next collective, or at the latest at the next layer boundary
    (:meth:`check` runs with the cancel check, which also times the layers).
    """

    def __init__(self, procs: list[subprocess.Popen[bytes]], log_dir: Path | None,
                 on_failure: Callable[[], None] | None = None, poll_s: float = 0.1,
                 beat_dir: Path | None = None, stall_min_s: float | None = None,
                 stall_layers: float = STALL_LAYERS, leader: Heartbeat | None = None) -> None:
        self.procs, self.log_dir, self.on_failure, self.poll_s = procs, log_dir, on_failure, poll_s
        self.beat_dir, self.leader = beat_dir, leader
        self.stall_min_s = default_stall_s() if stall_min_s is None else stall_min_s
        self.stall_layers = stall_layers
        self.longest_layer_s = 0.0
        self._layer_started: float | None = None
        now = time.monotonic()
        # Per rank: the last beat and progress seen, and when each last changed.
        self._seen: dict[int, tuple[int, tuple[int, int], float, float]] = {
            r: (-1, (-1, -1), now, now) for r in range(1, len(procs) + 1)}
        self.failure: RankFailed | None = None
        self.failed_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slimgpt-rank-watch", daemon=True)

    def __enter__(self) -> RankWatch:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def stall_s(self) -> float:
        """How long a helper may make no progress before it counts as hung."""
        return max(self.stall_min_s, self.stall_layers * self.longest_layer_s)

    def layer_boundary(self) -> None:
        """The leader starts a layer: the time since the last one is a layer's time."""
        now = time.monotonic()
        if self._layer_started is not None:
            self.longest_layer_s = max(self.longest_layer_s, now - self._layer_started)
        self._layer_started = now

    def _finished(self, rank: int) -> bool:
        if self.beat_dir is None:
            return True  # nothing to tell an early exit from the end by
        beat = read_beat(beat_path(self.beat_dir, rank))
        return beat is not None and beat[3]

    def _stalled(self, rank: int, now: float) -> str | None:
        """Why ``rank`` (alive) counts as hung, if it does."""
        assert self.beat_dir is not None
        beat = read_beat(beat_path(self.beat_dir, rank))
        last_beat, last_progress, beat_at, progress_at = self._seen[rank]
        if beat is None:
            beats, progress, inside = last_beat, last_progress, False
        else:
            beats, progress, inside = beat[0], (beat[1], beat[2]), beat[1] > beat[2] or beat[3]
        if beats != last_beat:
            beat_at = now
        if progress != last_progress:
            progress_at = now
        self._seen[rank] = (beats, progress, beat_at, progress_at)
        stall = self.stall_s
        if now - beat_at > stall:
            return (f"is hung: no heartbeat for {now - beat_at:.1f}s (stall limit {stall:.1f}s; "
                    "frozen, e.g. SIGSTOP)")
        # Every rank runs some phases without collectives (capturing the inputs, replaying the
        # finished layers after a resume, which may take many layers' time): a helper outside a
        # collective is stuck only once the leader, too, has been waiting for it that long.
        waiting = stall + 1.0  # without the leader's count: the helper's own time decides
        if self.leader is not None:
            since = self.leader.inside_since
            waiting = 0.0 if since is None else now - since
        if not inside and min(now - progress_at, waiting) > stall:
            return (f"is hung: no progress outside a collective for {now - progress_at:.1f}s "
                    f"(stall limit {stall:.1f}s; stuck, e.g. in a kernel)")
        return None

    def poll(self) -> RankFailed | None:
        """The first helper that has failed (exited abnormally or early, or stalled), if any
        (checked now)."""
        if self.failure is not None:
            return self.failure
        now = time.monotonic()
        for r, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None and (code != 0 or not self._finished(r)):
                self.failure = rank_failure(r, p, code, self.log_dir)
            elif code is None and self.beat_dir is not None:
                why = self._stalled(r, now)
                if why is not None:
                    self.failure = RankFailed(
                        f"helper rank {r} (pid {p.pid}) {why}{_log_tail(r, self.log_dir)}",
                        rank=r, cause="hung")
            if self.failure is not None:
                self.failed_at = now
                break
        return self.failure

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.poll() is not None:
                break
            self._stop.wait(self.poll_s)
        if self.failure is None:
            return
        logger.error("multi-GPU job: %s; stopping the other ranks", self.failure)
        kill_helpers(self.procs, grace_s=0.0)
        if self.on_failure is not None:
            try:
                self.on_failure()
            except Exception:  # the rank's death is what the leader reports
                logger.warning("after rank failure: on_failure raised", exc_info=True)

    def check(self) -> None:
        """Raise the recorded failure (the leader calls this between layers)."""
        if self.failure is not None:
            raise self.failure

    def failure_after(self, error: BaseException, wait_s: float = 3.0) -> RankFailed | None:
        """The leader's ``error`` may be a dead rank seen from a collective (a closed socket,
        an aborted communicator): give the helpers ``wait_s`` to be seen exiting."""
        if isinstance(error, RankFailed):
            return error
        deadline = time.monotonic() + wait_s
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.failure


def kill_helpers(procs: list[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    """Stop every helper still running: SIGTERM, then SIGKILL after ``grace_s``."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        if grace_s > 0:
            p.terminate()
        else:
            p.kill()
    for p in live:
        try:
            p.wait(timeout=max(grace_s, 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_helpers(procs: list[subprocess.Popen[bytes]], timeout_s: float = 60.0) -> list[int]:
    """Wait for the helper ranks to exit (killing stragglers); their exit codes."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def _follow_leader() -> None:
    """Make sure this helper does not outlive its leader (see the module docstring)."""
    leader = int(os.environ.get(LEADER_PID_ENV, "0") or 0)
    if not leader:
        return
    try:  # Linux: the kernel kills us when the leader (the thread that started us) exits
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the polling thread below still works
        logger.debug("PR_SET_PDEATHSIG unavailable", exc_info=True)

    def watch() -> None:
        while True:
            if os.getppid() != leader:
                os._exit(75)  # EX_TEMPFAIL: the leader is gone, nothing left to do
            time.sleep(1.0)

    if os.getppid() != leader:
        os._exit(75)
    threading.Thread(target=watch, name="slimgpt-leader-watch", daemon=True).start()


def _discard(_index: int, _tensors: dict[str, Any], report: dict[str, Any]) -> None:
    """Helpers write nothing (the leader writes the pruned layers)."""


def _open(job: RankJob) -> Any:
    if job.opener is None:
        from slimgpt_core.streaming import open_streamed

        return open_streamed(job.model_dir, job.dtype)
    import importlib

    for folder in reversed(job.pythonpath or []):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module, _, name = job.opener.partition(":")
    return getattr(importlib.import_module(module), name)(job.model_dir, job.dtype)


def peak_host_bytes() -> int:
    """High-water mark of this process's resident memory (VmHWM; 0 where unknown)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_helper(job: RankJob) -> None:
    """A non-leader rank: prune along with the others, write nothing but its own figures
    (``rank{r}.stats.json`` in ``ready_dir``: peak GPU and host memory, seconds)."""
    from safetensors.torch import load_file

    from slimgpt_core.collective import init_from_env, shutdown
    from slimgpt_core.pruner import PruneConfig, prune_model

    _follow_leader()
    t0 = time.perf_counter()
    streamed = _open(job)
    ids = load_file(job.calibration_file)["input_ids"]
    config = PruneConfig(**job.config)
    rank = os.environ.get("RANK", "?")
    cuda = False
    if config.device is None or config.device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            cuda = True
            config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    heart = None
    if job.ready_dir:
        (Path(job.ready_dir) / f"rank{rank}.ready").touch()
        heart = Heartbeat(beat_path(Path(job.ready_dir), int(rank))).start()
    if heart is not None:
        with heart.collective():  # forming the group waits for the others, like a collective
            comm = init_from_env(COLLECTIVE_TIMEOUT_S)
    else:
        comm = init_from_env(COLLECTIVE_TIMEOUT_S)
    if comm is None:
        raise SystemExit("slimgpt_core.multi_gpu: WORLD_SIZE must be > 1")
    if heart is not None:
        heart.wrap(comm)
    try:
        prune_model(streamed.model, ids, config, source=streamed.source, comm=comm,
                    on_layer=_discard if config.checkpoint_dir is None else None)
        if heart is not None:
            heart.finish()
    finally:
        shutdown()
    if job.ready_dir:
        stats: dict[str, Any] = {"rank": rank, "seconds": round(time.perf_counter() - t0, 2),
                                 "peak_host_bytes": peak_host_bytes(), "peak_gpu_bytes": None}
        if cuda:
            import torch

            stats["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(config.device)
        (Path(job.ready_dir) / f"rank{rank}.stats.json").write_text(json.dumps(stats))


def rank_stats(work_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What each helper of the last job in ``work_dir`` recorded about itself."""
    return [json.loads(p.read_text()) for p in sorted(Path(work_dir).glob("rank*.stats.json"))]


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m slimgpt_core.multi_gpu JOB.json", file=sys.stderr)
        return 2
    run_helper(RankJob.load(args[0]))
    return 0


def config_fields(config: Any) -> dict[str, Any]:
    """A PruneConfig as JSON-safe fields."""
    out = {}
    for k, v in asdict(config).items():
        out[k] = str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v)
    return out


def prune_streamed(
    streamed: Any,
    calibration: Any,
    config: Any,
    *,
    gpus: int = 1,
    work_dir: str | os.PathLike[str],
    dtype: str | None = None,
    progress: Any = None,
    should_cancel: Any = None,
    probes: Any = None,
    on_layer: Any = None,
    opener: str | None = None,
    pythonpath: list[str] | None = None,
    stall_min_s: float | None = None,
) -> Any:
    """Prune a model opened with :func:`~slimgpt_core.streaming.open_streamed` on ``gpus``
    GPUs of this host (this process leads; ``gpus - 1`` helper processes are started and
    waited for). Returns the leader's :class:`~slimgpt_core.pruner.PruneResult`.

    Raises :class:`~slimgpt_core.errors.RankFailed` as soon as a helper exits abnormally
    (the other helpers are stopped; finished layers stay checkpointed). ``on_layer`` is the
    leader's layer sink (see ``prune_model``); ``opener``/``pythonpath``: how helpers open
    the model when it is not a safetensors folder (see :class:`RankJob`). ``stall_min_s``:
    the floor of the stall time after which a live helper that makes no progress fails the
    job (default ``SLIMGPT_RANK_STALL_S`` or 120 s; see the module docstring).
    """
    from safetensors.torch import save_file

    from slimgpt_core.pruner import PruningCancelled, prune_model

    if gpus <= 1:
        return prune_model(streamed.model, calibration, config, progress, should_cancel,
                           source=streamed.source, probes=probes, on_layer=on_layer)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    calib_file = work / "calibration.safetensors"
    save_file({"input_ids": calibration.contiguous()}, str(calib_file))
    for old in [*work.glob("rank*.ready"), *work.glob("rank*.stats.json"),
                *work.glob("rank*.beat")]:
        old.unlink()
    job = RankJob(model_dir=str(streamed.folder), calibration_file=str(calib_file),
                  config=config_fields(config), dtype=dtype, ready_dir=str(work),
                  opener=opener, pythonpath=pythonpath)
    job_path = job.save(work / "rank_job.json")
    port = free_port()
    procs = start_helpers(job_path, gpus, port, log_dir=work)
    ok = False
    try:
        wait_ready(procs, work, work)
        lead = Heartbeat(None)
        with leader_group(gpus, port) as comm, \
                RankWatch(procs, work, on_failure=abort_group, beat_dir=work,
                          stall_min_s=stall_min_s, leader=lead) as watch:
            lead.wrap(comm)

            def cancel_or_dead() -> bool:
                watch.check()
                watch.layer_boundary()
                return bool(should_cancel()) if should_cancel is not None else False

            try:
                result = prune_model(streamed.model, calibration, config, progress,
                                     cancel_or_dead, source=streamed.source, comm=comm,
                                     probes=probes, on_layer=on_layer)
            except PruningCancelled:
                raise
            except Exception as exc:
                failure = watch.failure_after(exc)
                if failure is not None and failure is not exc:
                    raise failure from exc
                raise
        ok = True
    finally:
        if ok:
            codes = stop_helpers(procs, timeout_s=120.0)
        else:
            kill_helpers(procs)
            codes = [p.returncode for p in procs]
    bad = [(r + 1, c) for r, c in enumerate(codes) if c != 0]
    if bad:
        r, c = bad[0]
        raise rank_failure(r, procs[r - 1], c, work)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
