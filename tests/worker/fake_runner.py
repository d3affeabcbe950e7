"""A stand-in for ``worker.runner.run_job`` that a real Celery worker process imports.

Selected with ``SLIMGPT_RUNNER=tests.worker.fake_runner:run_job``; it leaves files in
``SLIMGPT_TEST_FAKE_RUNNER_DIR`` so the test can watch what happened.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def run_job(job_id: str) -> None:
    out = Path(os.environ["SLIMGPT_TEST_FAKE_RUNNER_DIR"])
    (out / f"{job_id}.started.{os.getpid()}").touch()
    blocked = out / f"{job_id}.blocked"
    if job_id.startswith("block-") and not blocked.exists():
        # First delivery: hang so the test can kill this worker mid-job. Later deliveries finish.
        blocked.touch()
        time.sleep(120)
    (out / f"{job_id}.done").write_text(f"{os.getpid()}\n")
