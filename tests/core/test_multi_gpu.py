"""One job over several processes (gloo on CPU here, NCCL on GPUs): equal to one process."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimgpt_core.errors import RankFailed
from slimgpt_core.multi_gpu import Heartbeat, HelperFailed, RankWatch, prune_streamed
from slimgpt_core.pruner import PruneConfig, prune_model
from slimgpt_core.streaming import open_streamed
from tests.core.tiny import tiny_llama, windows

CFG = {"target_ratio": 0.4, "batch_size": 2, "min_group": 8}


@pytest.mark.timeout(300)
def test_two_process_gloo_run_equals_one_process(tmp_path: Path) -> None:
    base = tiny_llama(num_heads=8, num_kv_heads=2, layers=2)
    base.save_pretrained(tmp_path / "dense")
    # Odd window count and micro-batches of 2: the ranks' Hessian sums are ordered
    # differently from one process's, so this compares up to float reordering.
    ids = windows(7)
    single = prune_model(copy.deepcopy(base), ids, PruneConfig(**CFG))
    streamed = open_streamed(tmp_path / "dense")
    double = prune_streamed(streamed, ids, PruneConfig(**CFG, checkpoint_dir=tmp_path / "ckpt"),
                            gpus=2, work_dir=tmp_path / "work")
    assert [(r.heads_kept, r.kv_heads_kept, r.channels_kept) for r in double.layers] == \
        [(r.heads_kept, r.kv_heads_kept, r.channels_kept) for r in single.layers]
    reference = single.model.state_dict()
    for path in double.layer_files:
        for key, tensor in load_file(path).items():
            torch.testing.assert_close(tensor, reference[key], rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(120)
def test_a_helper_that_dies_fails_the_job_at_once(tmp_path: Path) -> None:
    base = tiny_llama(layers=1)
    base.save_pretrained(tmp_path / "dense")
    streamed = open_streamed(tmp_path / "dense")
    streamed.folder = tmp_path / "gone"  # the helper cannot open the model
    with pytest.raises(HelperFailed, match="rank 1 .*exited with code 1"):
        prune_streamed(streamed, windows(4), PruneConfig(**CFG, checkpoint_dir=tmp_path / "c"),
                       gpus=2, work_dir=tmp_path / "work")


def _helper_pids(work_dir: Path) -> list[int]:
    """Live processes started as helpers of the job whose files are in ``work_dir``."""
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


@pytest.mark.timeout(180)
def test_a_rank_killed_mid_job_fails_it_within_seconds_naming_it_and_the_job_resumes(
        tmp_path: Path) -> None:
    base = tiny_llama(num_heads=8, num_kv_heads=2, layers=4)
    base.save_pretrained(tmp_path / "dense")
    ids = windows(4)
    config = PruneConfig(**CFG, checkpoint_dir=tmp_path / "ckpt")
    work = tmp_path / "work"
    killed: list[float] = []

    def kill_rank_1_after_layer_0(event) -> None:
        if event.phase == "layer_done" and event.layer == 0:
            pid = min(_helper_pids(work))  # rank 1 was started first
            assert os.getpgid(pid) != os.getpgid(0)  # group signals to the worker miss it
            os.kill(pid, signal.SIGKILL)
            killed.append(time.monotonic())

    # Three ranks: the survivor (rank 2) must be stopped too, not left waiting.
    with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) was killed by SIGKILL") as err:
        prune_streamed(open_streamed(tmp_path / "dense"), ids, config, gpus=3, work_dir=work,
                       progress=kill_rank_1_after_layer_0)
    assert time.monotonic() - killed[0] < 10.0  # not the 900 s collective timeout
    assert err.value.rank == 1
    assert _helper_pids(work) == []
    assert (tmp_path / "ckpt" / "layer_0000.safetensors").exists()

    # Resumed on another number of ranks: the checkpoints do not depend on it.
    resumed = prune_streamed(open_streamed(tmp_path / "dense"), ids, config, gpus=2,
                             work_dir=work)
    assert resumed.resumed_from >= 1 and len(resumed.layers) == 4
    single = prune_model(copy.deepcopy(base), ids, PruneConfig(**CFG))
    assert [(r.heads_kept, r.channels_kept) for r in resumed.layers] == \
        [(r.heads_kept, r.channels_kept) for r in single.layers]


# A stand-in leader that starts one helper-like process, which follows it the way a helper
# rank does, then waits to be killed. (On gloo a helper would also notice its leader's closed
# sockets; NCCL ranks on one host would wait for the collective timeout.)
LEADER = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "from slimgpt_core.multi_gpu import _follow_leader; import time; "
        "_follow_leader(); print('following', flush=True); time.sleep(600)"],
        env=dict(os.environ, SLIMGPT_LEADER_PID=str(os.getpid())), stdout=sys.stdout)
    print(child.pid, flush=True)
    time.sleep(600)
""")


def test_a_helper_rank_exits_when_its_leader_is_killed() -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    leader = subprocess.Popen([sys.executable, "-c", LEADER], env=env, stdout=subprocess.PIPE,
                              text=True)
    assert leader.stdout is not None
    child = int(leader.stdout.readline())
    try:
        assert leader.stdout.readline().strip() == "following"
        leader.kill()
        leader.wait()
        deadline = time.monotonic() + 5.0
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        leader.kill()
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_leftovers(work_dir: Path) -> None:
    for pid in _helper_pids(work_dir):  # a stopped process ignores SIGTERM; SIGKILL ends it
        os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_a_hung_helper_rank_fails_the_job_within_the_stall_time_naming_it(
        tmp_path: Path) -> None:
    base = tiny_llama(num_heads=8, num_kv_heads=2, layers=3)
    base.save_pretrained(tmp_path / "dense")
    config = PruneConfig(**CFG, checkpoint_dir=tmp_path / "ckpt")
    work = tmp_path / "work"
    stopped: list[float] = []

    def stop_rank_1_after_layer_0(event) -> None:
        if event.phase == "layer_done" and event.layer == 0:
            os.kill(min(_helper_pids(work)), signal.SIGSTOP)  # alive, but frozen
            stopped.append(time.monotonic())

    try:
        # Three ranks: the healthy rank 2 waits inside a collective and must not be blamed.
        with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) is hung: no heartbeat") as err:
            prune_streamed(open_streamed(tmp_path / "dense"), windows(4), config, gpus=3,
                           work_dir=work, progress=stop_rank_1_after_layer_0, stall_min_s=2.0)
        took = time.monotonic() - stopped[0]
        stall = float(re.search(r"stall limit ([\d.]+)s", str(err.value)).group(1))
        print(f"FIGURE hung rank detected {took:.2f}s after SIGSTOP (stall limit {stall:.1f}s)")
        assert stall >= 2.0 and took < stall + 5.0  # not the 900 s collective timeout
        assert err.value.rank == 1 and err.value.cause == "hung"
        assert _helper_pids(work) == []  # the stopped rank and the waiting one are both gone
        assert (tmp_path / "ckpt" / "layer_0000.safetensors").exists()  # resumable
    finally:
        _kill_leftovers(work)


# Opens the model as a helper normally would, then makes the helper leave with status 0 in the
# middle of the job (its third broadcast of an object).
EARLY_EXIT = textwrap.dedent("""
    import os
    from slimgpt_core.collective import DistributedCollective
    from slimgpt_core.streaming import open_streamed

    def open_then_quit(model_dir, dtype):
        real, calls = DistributedCollective.broadcast_object, []

        def quit_on_third(self, obj):
            calls.append(1)
            if len(calls) == 3:
                os._exit(0)
            return real(self, obj)

        DistributedCollective.broadcast_object = quit_on_third
        return open_streamed(model_dir, dtype)
""")


@pytest.mark.timeout(120)
def test_a_helper_rank_that_exits_cleanly_before_the_end_fails_the_job(tmp_path: Path) -> None:
    base = tiny_llama(num_heads=8, num_kv_heads=2, layers=3)
    base.save_pretrained(tmp_path / "dense")
    (tmp_path / "early_exit.py").write_text(EARLY_EXIT)
    work = tmp_path / "work"
    try:
        with pytest.raises(RankFailed, match=r"rank 1 .*exited with code 0 before the job"):
            prune_streamed(open_streamed(tmp_path / "dense"), windows(4),
                           PruneConfig(**CFG, checkpoint_dir=tmp_path / "ckpt"), gpus=2,
                           work_dir=work, opener="early_exit:open_then_quit",
                           pythonpath=[str(tmp_path)])
        assert _helper_pids(work) == []
    finally:
        _kill_leftovers(work)


class _LiveProc:
    pid = 1

    def poll(self) -> None:
        return None


def test_the_stall_time_grows_with_the_longest_layer_so_a_slow_helper_is_not_hung(
        tmp_path: Path) -> None:
    beat = tmp_path / "rank1.beat"
    beat.write_text("1 5 5 0\n")  # beating, outside a collective, progress unchanged below
    leader = Heartbeat(None)
    leader.inside_since = time.monotonic()  # the leader waits in a collective for it
    watch = RankWatch([_LiveProc()], None, beat_dir=tmp_path, stall_min_s=0.2, stall_layers=10,
                      leader=leader)
    watch.layer_boundary()
    time.sleep(0.1)
    watch.layer_boundary()  # a layer took ~0.1 s: stall limit ~1 s
    assert watch.stall_s >= 1.0
    for n in range(2, 6):  # 0.5 s without progress: slow, not hung
        beat.write_text(f"{n} 5 5 0\n")
        time.sleep(0.1)
        assert watch.poll() is None
    watch.longest_layer_s = 0.0  # with only the floor (0.2 s) the same helper counts as hung
    beat.write_text("7 5 5 0\n")
    failure = watch.poll()
    assert failure is not None and "no progress outside a collective" in str(failure)


def test_a_helper_outside_collectives_is_not_hung_while_the_leader_is_too(
        tmp_path: Path) -> None:
    """Capturing inputs or replaying finished layers after a resume runs no collective on any
    rank, for longer than the stall time on a big model: only the leader's waiting counts."""
    beat = tmp_path / "rank1.beat"
    beat.write_text("1 5 5 0\n")
    leader = Heartbeat(None)  # outside a collective, like the helper
    watch = RankWatch([_LiveProc()], None, beat_dir=tmp_path, stall_min_s=0.2, leader=leader)
    assert watch.poll() is None
    time.sleep(0.3)
    beat.write_text("2 5 5 0\n")
    assert watch.poll() is None  # 0.3 s without progress, but the leader is not waiting
    leader.inside_since = time.monotonic() - 0.3  # now the leader has waited the stall time
    assert watch.poll() is not None


# Opens the model as a helper normally would, then makes the helper hang in its own work
# (outside any collective; its heartbeat thread keeps beating), like a kernel that never ends.
STUCK = textwrap.dedent("""
    import time
    import slimgpt_core.pruner as pruner
    from slimgpt_core.streaming import open_streamed

    def open_then_stick(model_dir, dtype):
        pruner.capture_layer_inputs = lambda *a, **k: time.sleep(600)
        return open_streamed(model_dir, dtype)
""")


@pytest.mark.timeout(120)
def test_a_helper_rank_stuck_outside_a_collective_fails_the_job_naming_it(
        tmp_path: Path) -> None:
    base = tiny_llama(layers=2)
    base.save_pretrained(tmp_path / "dense")
    (tmp_path / "stuck.py").write_text(STUCK)
    work = tmp_path / "work"
    t0 = time.monotonic()
    try:
        with pytest.raises(RankFailed, match=r"rank 1 .*is hung: no progress outside a coll"):
            prune_streamed(open_streamed(tmp_path / "dense"), windows(4),
                           PruneConfig(**CFG, checkpoint_dir=tmp_path / "ckpt"), gpus=2,
                           work_dir=work, opener="stuck:open_then_stick",
                           pythonpath=[str(tmp_path)], stall_min_s=2.0)
        print(f"FIGURE stuck rank: job failed {time.monotonic() - t0:.2f}s after its start")
        assert time.monotonic() - t0 < 30.0
        assert _helper_pids(work) == []
    finally:
        _kill_leftovers(work)
