"""PUT/DELETE /v1/hub-token: encrypted at rest, never returned, never logged."""

from __future__ import annotations

import logging

from sqlalchemy import select

from app.core.logging import ScrubFilter, scrub
from app.crud.jobs import get_hub_token_for_job
from app.db.models import HubToken

TOKEN = "hf_SuperSecretTokenValue1234567890"


def test_put_token_is_204_and_status_says_configured(client, tenant):
    r = client.put("/v1/hub-token", json={"token": TOKEN}, headers=tenant.headers)
    assert r.status_code == 204 and r.content == b""
    status = client.get("/v1/hub-token", headers=tenant.headers)
    assert status.json()["configured"] is True and TOKEN not in status.text


def test_token_is_stored_encrypted(client, tenant, db):
    client.put("/v1/hub-token", json={"token": TOKEN}, headers=tenant.headers)
    with db() as s:
        row = s.scalars(select(HubToken).where(HubToken.tenant_id == tenant.tenant_id)).one()
    assert TOKEN.encode() not in row.ciphertext


def test_worker_reads_the_token_by_job_id(client, tenant, submit, db, settings):
    client.put("/v1/hub-token", json={"token": TOKEN}, headers=tenant.headers)
    job = submit({"model_id": "a/b", "target_ratio": 0.2,
                  "destination": {"hub_repo_id": "me/slim"}})
    with db() as s:
        assert get_hub_token_for_job(s, job["id"], settings) == TOKEN


def test_token_is_never_returned_by_any_route(client, tenant, submit, outbox):
    client.put("/v1/hub-token", json={"token": TOKEN}, headers=tenant.headers)
    job = submit({"model_id": "a/b", "target_ratio": 0.2,
                  "destination": {"hub_repo_id": "me/slim"}})
    for url in ("/v1/jobs", f"/v1/jobs/{job['id']}", "/v1/hub-token"):
        assert TOKEN not in client.get(url, headers=tenant.headers).text
    events = client.get(f"/v1/jobs/{job['id']}/events",
                        headers={**tenant.headers, "Accept": "application/json"})
    assert TOKEN not in events.text
    assert job["id"] in outbox.run_pass()
    assert TOKEN not in repr(outbox.publisher.sent)


def test_invalid_token_error_does_not_echo_it(client, tenant):
    secret = "hf_with space secret"
    r = client.put("/v1/hub-token", json={"token": secret}, headers=tenant.headers)
    assert r.status_code == 422 and "hf_with" not in r.text


def test_token_is_never_logged(client, tenant, caplog):
    with caplog.at_level(logging.DEBUG):
        client.put("/v1/hub-token", json={"token": TOKEN}, headers=tenant.headers)
    assert TOKEN not in caplog.text
    # and the scrub filter removes tokens and keys that code might log by mistake
    record = logging.LogRecord("slimgpt", logging.INFO, __file__, 1, "token=%s key=%s",
                               (TOKEN, tenant.key), None)
    ScrubFilter().filter(record)
    assert TOKEN not in record.getMessage() and tenant.key not in record.getMessage()
    assert TOKEN not in scrub(f"Authorization: Bearer {TOKEN}")


def test_delete_token(client, tenant, db):
    client.put("/v1/hub-token", json={"token": TOKEN}, headers=tenant.headers)
    assert client.delete("/v1/hub-token", headers=tenant.headers).status_code == 204
    assert client.get("/v1/hub-token", headers=tenant.headers).json()["configured"] is False
    assert client.delete("/v1/hub-token", headers=tenant.headers).status_code == 204


def test_unknown_field_in_token_body_is_422(client, tenant):
    r = client.put("/v1/hub-token", json={"token": TOKEN, "scope": "write"}, headers=tenant.headers)
    assert r.status_code == 422 and "scope" in r.json()["detail"]
