"""Launching one pruning job over several GPUs of a host, torchrun-style.

The process that owns the job (the worker's task, or ``slimgpt prune``) is rank 0, the leader:
it reports progress, writes the pruned layers and exports. It starts ranks ``1..N-1`` as
``python -m slimgpt_core.multi_gpu <job.json>`` with torchrun's variables (``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); every rank streams the model from
the same safetensors folder (memory-mapped, so the page cache is shared and host memory does
not grow with the number of GPUs) and joins the process group; see
:mod:`slimgpt_core.collective` for what the ranks exchange.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Collectives that take longer than this fail the job instead of hanging it (the leader's
#: maths for one layer of a 70B model takes seconds; a dead rank is what this catches).
COLLECTIVE_TIMEOUT_S = 900.0


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
            "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}


def start_helpers(job_path: Path, world_size: int, port: int,
                  log_dir: Path | None = None) -> list[subprocess.Popen[bytes]]:
    """Start ranks ``1..world_size-1`` of the job described by ``job_path``."""
    procs = []
    for rank in range(1, world_size):
        env = dict(os.environ, **rank_env(rank, world_size, port))
        out = (log_dir / f"rank{rank}.log").open("wb") if log_dir is not None else None
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "slimgpt_core.multi_gpu", str(job_path)],
            env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
    return procs


@contextmanager
def leader_group(world_size: int, port: int,
                 timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Iterator[Any]:
    """Join the job's process group as rank 0 (the caller's own process) for the block."""
    from slimgpt_core.collective import init_from_env, shutdown

    saved = {k: os.environ.get(k) for k in rank_env(0, world_size, port)}
    os.environ.update(rank_env(0, world_size, port))
    try:
        comm = init_from_env(timeout_s)
        yield comm
    finally:
        shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class HelperFailed(RuntimeError):
    """A helper rank exited with an error (its log is named in the message)."""


def wait_ready(procs: list[subprocess.Popen[bytes]], ready_dir: Path, log_dir: Path | None,
               timeout_s: float = 600.0) -> None:
    """Wait until every helper is ready to join the group; raise as soon as one has died."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        waiting = [r for r in range(1, len(procs) + 1)
                   if not (ready_dir / f"rank{r}.ready").exists()]
        if not waiting:
            return
        for r in waiting:
            code = procs[r - 1].poll()
            if code is not None:
                raise HelperFailed(_failure(r, code, log_dir))
        if time.monotonic() > deadline:
            raise HelperFailed(f"helper ranks {waiting} were not ready after {timeout_s:.0f}s")
        time.sleep(0.2)


def _failure(rank: int, code: int, log_dir: Path | None) -> str:
    tail = ""
    if log_dir is not None and (log_dir / f"rank{rank}.log").exists():
        lines = (log_dir / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()
        tail = ": " + " | ".join(lines[-3:])
    return f"helper rank {rank} exited with code {code}{tail}"


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


def run_helper(job: RankJob) -> None:
    """A non-leader rank: prune along with the others, write nothing."""
    from safetensors.torch import load_file

    from slimgpt_core.collective import init_from_env, shutdown
    from slimgpt_core.pruner import PruneConfig, prune_model
    from slimgpt_core.streaming import open_streamed

    streamed = open_streamed(job.model_dir, job.dtype)
    ids = load_file(job.calibration_file)["input_ids"]
    config = PruneConfig(**job.config)
    if config.device is None or config.device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if job.ready_dir:
        (Path(job.ready_dir) / f"rank{os.environ.get('RANK', '?')}.ready").touch()
    comm = init_from_env(COLLECTIVE_TIMEOUT_S)
    if comm is None:
        raise SystemExit("slimgpt_core.multi_gpu: WORLD_SIZE must be > 1")
    try:
        prune_model(streamed.model, ids, config, source=streamed.source, comm=comm)
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m slimgpt_core.multi_gpu JOB.json", file=sys.stderr)
        return 2
    run_helper(RankJob.load(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


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
) -> Any:
    """Prune a model opened with :func:`~slimgpt_core.streaming.open_streamed` on ``gpus``
    GPUs of this host (this process leads; ``gpus - 1`` helper processes are started and
    waited for). Returns the leader's :class:`~slimgpt_core.pruner.PruneResult`."""
    from safetensors.torch import save_file

    from slimgpt_core.pruner import prune_model

    if gpus <= 1:
        return prune_model(streamed.model, calibration, config, progress, should_cancel,
                           source=streamed.source, probes=probes)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    calib_file = work / "calibration.safetensors"
    save_file({"input_ids": calibration.contiguous()}, str(calib_file))
    for old in work.glob("rank*.ready"):
        old.unlink()
    job = RankJob(model_dir=str(streamed.folder), calibration_file=str(calib_file),
                  config=config_fields(config), dtype=dtype, ready_dir=str(work))
    job_path = job.save(work / "rank_job.json")
    port = free_port()
    procs = start_helpers(job_path, gpus, port, log_dir=work)
    ok = False
    try:
        wait_ready(procs, work, work)
        with leader_group(gpus, port) as comm:
            result = prune_model(streamed.model, calibration, config, progress, should_cancel,
                                 source=streamed.source, comm=comm, probes=probes)
        ok = True
    finally:
        codes = stop_helpers(procs, timeout_s=120.0 if ok else 5.0)
    bad = [(r + 1, c) for r, c in enumerate(codes) if c != 0]
    if bad:
        raise HelperFailed("; ".join(_failure(r, c, work) for r, c in bad))
    return result
