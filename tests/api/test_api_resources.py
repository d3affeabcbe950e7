"""Jobs say what they need (`resources`); the API routes them to a worker pool or refuses them."""

from __future__ import annotations

import json

import pytest

from app.routing import NoWorkerPool, PoolConfigError, WorkerPool, parse_pools, route

LLAMA3_70B = {"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192,
              "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
              "vocab_size": 128256}
REQUEST = {"target_ratio": 0.2}


def test_pools_are_parsed_from_queue_count_type_entries() -> None:
    pools = parse_pools("one=1xh200, two=2xh200 ,small=1x@24", "slimgpt")
    assert pools == [WorkerPool("one", 1, "h200"), WorkerPool("two", 2, "h200"),
                     WorkerPool("small", 1, None, 24.0)]
    assert pools[0].memory_gb == 141.0 and pools[2].memory_gb == 24.0


def test_without_pools_the_default_queue_is_the_one_pool() -> None:
    assert parse_pools("", "slimgpt", 2) == [WorkerPool("slimgpt", 2)]


@pytest.mark.parametrize("bad", ["q=2", "q=0xh200", "q=1xtpu", "=1xh200"])
def test_malformed_pools_are_refused(bad: str) -> None:
    with pytest.raises(PoolConfigError):
        parse_pools(bad, "slimgpt")


def test_a_job_goes_to_the_smallest_pool_that_has_enough_gpus() -> None:
    pools = parse_pools("eight=8xh200,one=1xh200,two=2xh200", "slimgpt")
    assert route({**REQUEST, "resources": {"gpus": 2}}, pools).queue == "two"
    assert route(REQUEST, pools).queue == "one"


def test_minimum_gpu_memory_skips_smaller_gpus() -> None:
    pools = parse_pools("small=1xl40s,big=1xh200", "slimgpt")
    assert route({**REQUEST, "resources": {"gpus": 1, "min_gpu_memory_gb": 80}}, pools).queue \
        == "big"


def test_the_estimated_peak_must_fit_the_pools_gpus() -> None:
    pools = parse_pools("tiny=1x@16,big=1xh200", "slimgpt")
    assert route(REQUEST, pools, LLAMA3_70B).queue == "big"
    with pytest.raises(NoWorkerPool) as info:
        route(REQUEST, pools[:1], LLAMA3_70B)
    assert "busiest GPU" in str(info.value)
    assert info.value.estimates[0]["peak_gpu_gb"] > 16


def test_job_asking_for_more_gpus_than_any_worker_has_is_refused(client, tenant, job_body,
                                                                settings, monkeypatch):
    monkeypatch.setattr(settings, "gpu_pools", "one=1xh200")
    r = client.post("/v1/jobs", json={**job_body, "resources": {"gpus": 2}},
                    headers=tenant.headers)
    assert r.status_code == 422
    assert "fewer than 2 GPUs" in r.json()["detail"]
    assert r.json()["code"] == "no_worker_pool"


def test_job_that_fits_no_pool_is_refused_with_the_estimate(client, tenant, job_body, settings,
                                                            models_dir, monkeypatch):
    folder = models_dir / "llama3-70b-config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA3_70B))
    monkeypatch.setattr(settings, "gpu_pools", "small=1x@16")
    r = client.post("/v1/jobs", json={**job_body, "model_id": "llama3-70b-config"},
                    headers=tenant.headers)
    assert r.status_code == 422
    detail = r.json()  # problem details with the estimates as an extension member
    assert detail["estimates"][0]["placement"] == "stream"
    assert detail["estimates"][0]["peak_gpu_gb"] > 16


def test_job_with_resources_a_pool_has_is_accepted(client, tenant, job_body, settings,
                                                  monkeypatch):
    monkeypatch.setattr(settings, "gpu_pools", "one=1xh200,two=2xh200")
    r = client.post("/v1/jobs", json={**job_body, "resources": {"gpus": 2}},
                    headers=tenant.headers)
    assert r.status_code == 202, r.text
    assert r.json()["request"]["resources"] == {"gpus": 2, "min_gpu_memory_gb": None}


def test_estimate_reports_resources_per_gpu_type_and_count_and_the_route(client, tenant,
                                                                         settings, monkeypatch):
    monkeypatch.setattr(settings, "gpu_pools", "one=1xh200,two=2xh200")
    r = client.post("/v1/estimate", json={"config": LLAMA3_70B, "target_ratio": 0.2,
                                          "resources": {"gpus": 2}}, headers=tenant.headers)
    assert r.status_code == 200, r.text
    res = r.json()["resources"]
    h200 = {e["gpus"]: e for e in res["estimates"] if e["gpu_type"] == "h200"}
    assert set(h200) == {1, 2, 4, 8}
    assert h200[1]["placement"] == "stream" and h200[1]["peak_host_gb"] < 32
    assert h200[2]["predicted_s"] < h200[1]["predicted_s"]
    assert res["route"] == {"queue": "two", "pool": "two: 2 x h200 (141 GB)", "fits": True}
    assert res["model"]["time_error_leave_one_shape_out"] > 0


def test_dispatch_sends_a_job_to_the_queue_of_its_pool(settings, monkeypatch):
    from app.db.models import Job
    from app.dispatch import queue_for_job

    monkeypatch.setattr(settings, "gpu_pools", "one=1xh200,two=2xh200")
    job = Job(model_id="a/b", request={"target_ratio": 0.2, "resources": {"gpus": 2}})
    assert queue_for_job(job, settings) == "two"
    assert queue_for_job(Job(model_id="a/b", request={"target_ratio": 0.2}), settings) == "one"
