"""``SLIMGPT_RUNNER=tests.reliability.fake_runner:run_job``: the real job lifecycle
(``worker.runner.JobRunner``: claim, lease renewal, hand-back on SIGTERM, cancel, failure)
around a fast fake pipeline, so fault tests run hundreds of jobs in seconds.

The fake pipeline "prunes" ``SLIMGPT_TEST_FAKE_LAYERS`` layers (default 4), sleeping
``SLIMGPT_TEST_LAYER_DELAY_S`` inside each (the place to kill it mid-layer), checkpointing each
finished layer (a hash chain), resuming from its checkpoints, and writing a layer event per
layer, like the real one. Its result is the chain's digest, equal for an interrupted and an
uninterrupted run (:func:`expected_digest`). Before it records success it appends
``job_id worker_id`` to ``completions.log`` under ``SLIMGPT_TEST_FAKE_RUNNER_DIR``: a job that
ran to completion twice shows up twice.

Model ids with a meaning: ``test/poison`` kills its own process (SIGKILL) every time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from app.crud import jobs as crud
from worker.lifecycle import JobControl
from worker.runner import JobRunner, _State, as_worker_settings, checkpoint_dir

LAYERS_ENV = "SLIMGPT_TEST_FAKE_LAYERS"
DELAY_ENV = "SLIMGPT_TEST_LAYER_DELAY_S"
OUT_ENV = "SLIMGPT_TEST_FAKE_RUNNER_DIR"


def expected_digest(job_id: str, layers: int) -> str:
    digest = hashlib.sha256(job_id.encode()).hexdigest()
    for i in range(layers):
        digest = hashlib.sha256(f"{digest}:{i}".encode()).hexdigest()
    return digest


class FakeRunner(JobRunner):
    def _pipeline(self, job_id: str, token: str | None, ctl: JobControl, state: _State) -> None:
        with self.db() as s:
            job = crud.get_job(s, job_id)
            assert job is not None
            model_id = job.model_id
        layers = int(os.environ.get(LAYERS_ENV, "4"))
        delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        self.event(job_id, "loading", f"loading {model_id}", num_layers=layers, percent=1.0)
        if model_id == "test/poison":
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt = checkpoint_dir(self.settings, job_id)
        ckpt.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(job_id.encode()).hexdigest()
        done = 0
        while (ckpt / f"layer{done}").exists():
            digest = (ckpt / f"layer{done}").read_text()
            done += 1
        if done:
            self.event(job_id, "pruning", f"resuming from layer {done}/{layers}", layer=done,
                       num_layers=layers, metrics={"kind": "resumed", "resumed_from": done})
        for i in range(done, layers):
            ctl.check()  # the layer boundary: lease lost, hand back, cancel
            if delay:
                time.sleep(delay)  # inside layer i: nothing of it is saved yet
            digest = hashlib.sha256(f"{digest}:{i}".encode()).hexdigest()
            tmp = ckpt / f".layer{i}.tmp"
            tmp.write_text(digest)
            tmp.replace(ckpt / f"layer{i}")
            self.event(job_id, "pruning", f"layer {i + 1}/{layers} done", layer=i,
                       num_layers=layers, percent=10.0 + 75.0 * (i + 1) / layers,
                       metrics={"kind": "layer_done"})
        ctl.check()
        with self.db() as s:
            finished = crud.finish_job(s, job_id, "succeeded", result={"digest": digest},
                                       metrics={"resumed_from": done, "layers": layers},
                                       worker_id=self.worker_id)
        if finished is None:
            return  # our lease was lost: the worker that holds it now finishes the job
        shutil.rmtree(ckpt.parent, ignore_errors=True)
        out = os.environ.get(OUT_ENV)
        if out:
            with open(Path(out) / "completions.log", "a") as fh:
                fh.write(f"{job_id} {self.worker_id}\n")


def run_job(job_id: str, settings: Any = None, **components: Any) -> None:
    FakeRunner(as_worker_settings(settings), **components).run(job_id)
