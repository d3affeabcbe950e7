"""A rank of a multi-GPU job killed mid-job: how fast the job fails, what it says, and that it
resumes from its checkpoints (NCCL on GPUs, gloo on CPU).

Runs a generated model through the library's launcher (:func:`slimgpt_core.multi_gpu.prune_streamed`)
on ``--gpus`` ranks, SIGKILLs helper rank 1 right after layer ``--kill-after`` is finished, and
measures the seconds from the kill to the leader's :class:`~slimgpt_core.errors.RankFailed`
(without the rank watch a NCCL leader waits for the 900 s collective timeout). Then it runs the
same job again on the same checkpoint folder and reports where it resumed. Prints one JSON line.

    python benchmarks/rank_death.py                          # 2 GPUs, NCCL
    python benchmarks/rank_death.py --device cpu --shape tiny-gqa --nsamples 4 --seqlen 64
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import SHAPES, dump, open_generated

from slimgpt_core.errors import RankFailed
from slimgpt_core.multi_gpu import prune_streamed
from slimgpt_core.pruner import PruneConfig


def helper_pids(work_dir: Path) -> list[int]:
    """Live helper ranks of the job whose files are in ``work_dir``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().split(") ")[-1].split()[0]
        except OSError:
            continue
        if "slimgpt_core.multi_gpu" in cmd and str(work_dir) in cmd and state != "Z":
            pids.append(int(proc.name))
    return pids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="cpu-medium")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--kill-after", type=int, default=1, help="layer index after which to kill")
    ap.add_argument("--hang-s", type=float, default=45.0,
                    help="give up (record a hang, exit 3) this long after the kill")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="rank-death-"))
    work = tmp / "ranks"
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(1))
    config = PruneConfig(target_ratio=0.2, batch_size=args.batch_size, device=args.device,
                         checkpoint_dir=tmp / "ckpt")
    launch = {"gpus": args.gpus, "work_dir": work, "dtype": str(dtype).removeprefix("torch."),
              "opener": "synthetic:open_generated",
              "pythonpath": [str(Path(__file__).resolve().parent)]}
    killed: dict[str, float] = {}
    killed_timer: list[threading.Timer] = []

    def kill_rank_1(event) -> None:
        if event.phase == "layer_done" and event.layer == args.kill_after and not killed:
            pids = helper_pids(work)
            os.kill(min(pids), signal.SIGKILL)
            killed["at"] = time.monotonic()
            print(f"killed helper rank 1 (pid {min(pids)}) after layer {event.layer}",
                  file=sys.stderr, flush=True)

            def hung() -> None:  # the behaviour the watch exists to prevent: say so and stop
                dump({**record, "stage": "hung", "hang_s": args.hang_s}, args.out)
                os._exit(3)

            timer = threading.Timer(args.hang_s, hung)
            timer.daemon = True
            timer.start()
            killed_timer.append(timer)

    record: dict = {"shape": args.shape, "device": args.device, "gpus": args.gpus,
                    "backend": "nccl" if cuda else "gloo", "torch": torch.__version__,
                    "kill_after_layer": args.kill_after}
    t0 = time.monotonic()
    try:
        prune_streamed(open_generated(args.shape, dtype), ids, config, progress=kill_rank_1,
                       **launch)
        record["error"] = None
    except RankFailed as exc:
        record.update(error=str(exc), error_type="RankFailed", rank=exc.rank, cause=exc.cause)
    except Exception as exc:  # noqa: BLE001 - recorded: the wrong kind of failure is a finding
        record.update(error=f"{type(exc).__name__}: {exc}"[:500], error_type=type(exc).__name__)
    failed_at = time.monotonic()
    for timer in killed_timer:
        timer.cancel()
    record["first_run_s"] = round(failed_at - t0, 2)
    record["kill_to_error_s"] = round(failed_at - killed["at"], 2) if killed else None
    record["helpers_left"] = len(helper_pids(work))
    record["layers_checkpointed"] = len(list((tmp / "ckpt").glob("layer_*.safetensors")))
    dump({**record, "stage": "killed"}, args.out)

    t0 = time.monotonic()
    result = prune_streamed(open_generated(args.shape, dtype), ids, config, **launch)
    record.update(resumed_from=result.resumed_from, layers_done=len(result.layers),
                  resume_run_s=round(time.monotonic() - t0, 2))
    dump({**record, "stage": "resumed"}, args.out)


if __name__ == "__main__":
    main()
