"""``python -m worker``: start a GPU worker with the settings from the environment."""

from __future__ import annotations

from worker.celery_app import app, worker_argv
from worker.settings import WorkerSettings


def main() -> None:
    app.worker_main(worker_argv(WorkerSettings()))


if __name__ == "__main__":
    main()
