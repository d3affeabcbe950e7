"""Celery configuration and the raw broker message (real Redis, no worker)."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from worker.celery_app import celery_config, make_celery, worker_argv
from worker.redact import register_secret
from worker.settings import WorkerSettings
from worker.tasks import RUN_JOB_TASK, enqueue_job, load_runner

from .conftest import RedisNamespace


def test_config_is_fit_for_hour_long_gpu_jobs() -> None:
    settings = WorkerSettings(job_soft_time_limit_s=3600, queue="gpu-80g")
    conf = celery_config(settings)
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_concurrency"] == 1
    assert conf["task_soft_time_limit"] == 3600
    assert conf["task_time_limit"] == settings.hard_limit_s > 3600
    assert conf["broker_transport_options"]["visibility_timeout"] > conf["task_time_limit"]
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["result_backend"] is None and conf["task_ignore_result"] is True
    assert conf["task_default_queue"] == "gpu-80g"
    # A broker blip must not cancel a running GPU job (the lease stops a second copy).
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is False
    assert conf["worker_send_task_events"] is True and conf["task_send_sent_event"] is True
    argv = worker_argv(settings, hostname="w1@host")
    assert argv[:3] == ["worker", "--queues", "gpu-80g"]
    assert "--concurrency" in argv and argv[argv.index("--concurrency") + 1] == "1"


def test_app_registers_the_task_and_refuses_pickle() -> None:
    app = make_celery(WorkerSettings())
    assert RUN_JOB_TASK in app.tasks
    assert "pickle" not in app.conf.accept_content
    assert app.conf.task_acks_late and app.conf.worker_prefetch_multiplier == 1


def test_load_runner_rejects_bad_specs() -> None:
    assert load_runner("os.path:join") is not None
    with pytest.raises(ValueError):
        load_runner("no-colon")


def test_broker_message_carries_only_the_job_id(redis_ns: RedisNamespace) -> None:
    token = "hf_" + "Tok3n" * 8
    register_secret(token)
    settings = WorkerSettings(
        broker_url=redis_ns.url, queue=redis_ns.queue, broker_key_prefix=redis_ns.prefix
    )
    app = make_celery(settings)
    job_id = "0b7f6a0c-5d1e-4c1e-9a53-1f1c2d3e4f50"
    task_id = enqueue_job(app, job_id)
    assert task_id == job_id  # Flower and `celery inspect` show jobs by their id

    client = redis.Redis.from_url(redis_ns.url)
    raw = client.lrange(f"{redis_ns.prefix}{redis_ns.queue}", 0, -1)
    assert len(raw) == 1
    assert token.encode() not in raw[0]
    message = json.loads(raw[0])
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == RUN_JOB_TASK and message["headers"]["id"] == task_id
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [job_id] and kwargs == {}
    assert message["headers"]["argsrepr"] == repr([job_id])
    # Nothing else of the job travels: no model, no options, no token.
    assert set(message["headers"]) >= {"task", "id", "argsrepr"}
    with pytest.raises(ValueError):
        enqueue_job(app, f"{job_id} {token}")


def test_enqueue_routes_by_queue(redis_ns: RedisNamespace) -> None:
    settings = WorkerSettings(
        broker_url=redis_ns.url, queue=redis_ns.queue, broker_key_prefix=redis_ns.prefix
    )
    app = make_celery(settings)
    enqueue_job(app, "job-a", queue=f"{redis_ns.queue}-80g")
    client = redis.Redis.from_url(redis_ns.url)
    assert client.llen(f"{redis_ns.prefix}{redis_ns.queue}-80g") == 1
    assert client.llen(f"{redis_ns.prefix}{redis_ns.queue}") == 0


def test_the_worker_parent_preloads_the_pipeline_without_torch() -> None:
    # The parent imports worker.runner once so that each fresh pool child does not; it must
    # stay free of torch/CUDA (a forked child must not inherit a CUDA context).
    import subprocess
    import sys

    code = ("import sys, worker.celery_app as c; c._preload_runner(); "
            "assert 'worker.runner' in sys.modules; assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
