"""Idempotency-Key: same key + body = same job; other body = 409; races make one job."""

from __future__ import annotations

import threading
import uuid

from sqlalchemy import func, select

from app.db.models import Job

BODY = {"model_id": "HuggingFaceTB/SmolLM2-135M", "target_ratio": 0.25}


def test_same_key_and_body_return_the_same_job(client, tenant, outbox):
    h = {**tenant.headers, "Idempotency-Key": str(uuid.uuid4())}
    first = client.post("/v1/jobs", json=BODY, headers=h)
    second = client.post("/v1/jobs", json=BODY, headers=h)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    assert outbox.run_pass().count(first.json()["id"]) == 1


def test_same_key_with_equivalent_body_is_the_same_job(client, tenant):
    h = {**tenant.headers, "Idempotency-Key": str(uuid.uuid4())}
    first = client.post("/v1/jobs", json=BODY, headers=h)
    # Defaults spelled out are the same request.
    second = client.post("/v1/jobs", json={**BODY, "revision": "main", "schedule": "log"}, headers=h)
    assert first.json()["id"] == second.json()["id"]


def test_same_key_with_another_body_is_409(client, tenant):
    h = {**tenant.headers, "Idempotency-Key": str(uuid.uuid4())}
    assert client.post("/v1/jobs", json=BODY, headers=h).status_code == 202
    r = client.post("/v1/jobs", json={**BODY, "target_ratio": 0.3}, headers=h)
    assert r.status_code == 409 and "Idempotency-Key" in r.json()["detail"]


def test_idempotency_keys_are_per_tenant(client, tenant, other_tenant):
    key = str(uuid.uuid4())
    a = client.post("/v1/jobs", json=BODY, headers={**tenant.headers, "Idempotency-Key": key})
    b = client.post("/v1/jobs", json=BODY, headers={**other_tenant.headers, "Idempotency-Key": key})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


def test_concurrent_duplicates_create_exactly_one_job(client, tenant, outbox, db):
    key = str(uuid.uuid4())
    h = {**tenant.headers, "Idempotency-Key": key}
    n = 8
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def go(i: int) -> None:
        barrier.wait()
        results[i] = client.post("/v1/jobs", json=BODY, headers=h)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r is not None and r.status_code == 202 for r in results), [
        (r.status_code, r.text) for r in results if r is not None]
    ids = {r.json()["id"] for r in results}
    assert len(ids) == 1
    with db() as s:
        count = s.scalar(select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant.tenant_id, Job.idempotency_key == key))
    assert count == 1
    assert [i for i in outbox.run_pass() if i in ids] == list(ids)
