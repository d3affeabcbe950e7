"""POST/GET /v1/jobs, cancel, pagination and filters."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from app.crud import jobs as crud
from app.db.models import Job
from tests.api.conftest import JOB


def test_submit_answers_202_with_a_queued_job(client, tenant, job_body):
    r = client.post("/v1/jobs", json=job_body, headers=tenant.headers)
    assert r.status_code == 202
    body = r.json()
    assert body["state"] == "queued" and body["id"]
    assert r.headers["location"] == f"/v1/jobs/{body['id']}"
    assert body["progress"]["phase"] == "queued"


def test_submit_fills_request_defaults(submit):
    job = submit()
    req = job["request"]
    assert req["revision"] == "main" and req["schedule"] == "log"
    assert req["calibration"] == {"source": "c4", "num_samples": 128, "seq_len": 2048, "seed": 0}
    assert req["pruning"]["gqa_policy"] == "free" and req["pruning"]["percdamp"] == 0.01
    assert req["export"] == {"profile": "hetero"}
    assert req["destination"] == {"hub_repo_id": None, "private": True, "create_pr": False}
    assert req["evaluate"]["perplexity"] is True
    assert req["heal"] is None


def test_uniform_profile_defaults_to_balanced_heads(submit):
    req = submit({**JOB, "export": {"profile": "uniform"}})["request"]
    assert req["pruning"]["gqa_policy"] == "balanced" and req["schedule"] == "uniform"


def test_the_preset_defaults_to_standard_and_quality_is_kept(submit):
    assert submit()["request"]["pruning"]["preset"] == "standard"
    req = submit({**JOB, "pruning": {"preset": "quality"}})["request"]
    assert req["pruning"]["preset"] == "quality"


def test_heal_request_is_kept_with_its_defaults(submit):
    req = submit({**JOB, "heal": {"tokens": 50_000}})["request"]
    assert req["heal"] == {"tokens": 50_000, "mode": "lora"}


def test_the_dispatcher_sends_a_submitted_job_once_to_the_configured_queue(submit, outbox,
                                                                           settings):
    job = submit()
    assert outbox.run_pass().count(job["id"]) == 1
    assert (job["id"], settings.celery_queue) in outbox.publisher.sent
    assert job["id"] not in outbox.run_pass()  # marked as sent: not sent again right away


def test_a_broker_outage_neither_fails_nor_slows_a_submission(client, tenant, outbox, job_body,
                                                               db):
    outbox.publisher.fail = True
    r = client.post("/v1/jobs", json=job_body, headers=tenant.headers)
    assert r.status_code == 202 and r.json()["state"] == "queued"
    assert outbox.run_pass() == []
    with db() as s:
        row = s.get(Job, r.json()["id"])
        assert row.state == "queued" and row.dispatch_count == 0  # still in the outbox
    outbox.publisher.fail = False
    time.sleep(0.6)  # the dispatcher's first broker retry delay
    assert r.json()["id"] in outbox.run_pass()


def test_a_retry_with_the_same_idempotency_key_after_a_broker_outage_is_the_queued_job(
        client, tenant, outbox, job_body):
    outbox.publisher.fail = True
    h = {**tenant.headers, "Idempotency-Key": "retry-after-outage"}
    first = client.post("/v1/jobs", json=job_body, headers=h)
    again = client.post("/v1/jobs", json=job_body, headers=h)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["state"] == "queued"


def test_get_job_returns_progress_metrics_and_result(client, tenant, submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 60)
        crud.add_event(s, job["id"], phase="pruning", message="layer 3", layer=3, num_layers=30,
                       percent=10.0, eta_s=42.0)
        crud.finish_job(s, job["id"], "succeeded",
                        metrics={"params_before": 10, "params_after": 8, "ppl_after": 20.5},
                        result={"artifact_dir": "/x", "hub_url": None})
    r = client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers)
    assert r.status_code == 200
    body = r.json()
    assert body["state"] == "succeeded" and body["attempts"] == 1
    assert body["progress"]["layer"] == 3 and body["progress"]["num_layers"] == 30
    assert body["progress"]["percent"] == 100.0
    assert body["metrics"]["params_after"] == 8
    assert body["result"]["artifact_dir"] == "/x"
    assert body["started_at"] and body["finished_at"] and body["duration_s"] >= 0


def test_get_unknown_job_is_404(client, tenant):
    r = client.get("/v1/jobs/00000000-0000-0000-0000-000000000000", headers=tenant.headers)
    assert r.status_code == 404
    assert client.get("/v1/jobs/not-a-uuid", headers=tenant.headers).status_code == 404


def test_list_is_newest_first_with_cursor_pagination(client, tenant, submit):
    ids = [submit()["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params, headers=tenant.headers).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))


def test_list_filters_by_state_and_model(client, tenant, submit, db):
    a = submit()
    b = submit({"model_id": "other/model", "target_ratio": 0.3})
    with db() as s:
        crud.finish_job(s, a["id"], "failed", error="boom")
    failed = client.get("/v1/jobs", params={"state": "failed"}, headers=tenant.headers).json()
    assert [j["id"] for j in failed["items"]] == [a["id"]]
    other = client.get("/v1/jobs", params={"model_id": "other/model"}, headers=tenant.headers)
    assert [j["id"] for j in other.json()["items"]] == [b["id"]]


def test_list_filters_by_created_range(client, tenant, submit):
    job = submit()
    created = datetime.fromisoformat(job["created_at"])
    later = (created + timedelta(seconds=1)).isoformat()
    earlier = (created - timedelta(seconds=1)).isoformat()
    hit = client.get("/v1/jobs", params={"created_after": earlier, "created_before": later},
                     headers=tenant.headers).json()["items"]
    miss = client.get("/v1/jobs", params={"created_after": later}, headers=tenant.headers)
    assert [j["id"] for j in hit] == [job["id"]]
    assert miss.json()["items"] == []


def test_list_rejects_a_bad_cursor(client, tenant):
    r = client.get("/v1/jobs", params={"cursor": "garbage!"}, headers=tenant.headers)
    assert r.status_code == 422 and "cursor" in r.json()["detail"]


def test_list_rejects_an_unknown_state(client, tenant):
    r = client.get("/v1/jobs", params={"state": "exploded"}, headers=tenant.headers)
    assert r.status_code == 422 and "state" in r.json()["detail"]


def test_cancel_queued_job_cancels_it_at_once(client, tenant, submit):
    job = submit()
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 202 and r.json()["state"] == "cancelled"


def test_cancel_running_job_sets_the_flag(client, tenant, submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 60)
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 202
    assert r.json()["state"] == "running" and r.json()["cancel_requested"] is True
    with db() as s:
        assert crud.is_cancel_requested(s, job["id"])


def test_cancel_finished_job_is_409(client, tenant, submit, db):
    job = submit()
    with db() as s:
        crud.finish_job(s, job["id"], "succeeded")
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 409 and "succeeded" in r.json()["detail"]


def test_timestamps_are_utc(submit):
    created = datetime.fromisoformat(submit()["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 60
