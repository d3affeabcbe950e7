"""API keys: hashed, bound to a tenant; a key sees only its tenant's objects (404 otherwise)."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import select

from app.crud import jobs as crud
from app.crud.tenants import revoke_api_key
from app.db.models import ApiKey


def test_missing_key_is_401(client):
    r = client.get("/v1/jobs")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_wrong_key_is_401(client, tenant):
    bad = tenant.key[:-3] + "xyz"
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {bad}"}).status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer nonsense"}).status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Basic abc"}).status_code == 401


def test_x_api_key_header_is_accepted(client, tenant):
    assert client.get("/v1/jobs", headers={"X-API-Key": tenant.key}).status_code == 200


def test_revoked_key_is_401(client, tenant, db):
    with db() as s:
        assert revoke_api_key(s, tenant.key_id)
    assert client.get("/v1/jobs", headers=tenant.headers).status_code == 401


def test_keys_are_stored_hashed(tenant, db):
    with db() as s:
        row = s.scalars(select(ApiKey).where(ApiKey.id == tenant.key_id)).one()
    assert tenant.key not in row.key_hash and len(row.key_hash) == 64


def test_list_shows_only_own_jobs(client, tenant, other_tenant, submit):
    mine = submit()
    theirs = submit(ctx=other_tenant)
    ids = {j["id"] for j in client.get("/v1/jobs", headers=tenant.headers).json()["items"]}
    assert mine["id"] in ids and theirs["id"] not in ids


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/{job}"),
        ("POST", "/v1/jobs/{job}/cancel"),
        ("GET", "/v1/jobs/{job}/events"),
        ("GET", "/v1/jobs/{job}/artifacts"),
        ("GET", "/v1/jobs/{job}/artifacts/config.json"),
        ("GET", "/v1/files/{file}"),
    ],
)
def test_other_tenants_objects_are_404(client, tenant, other_tenant, submit, db, settings,
                                       method, path):
    job = submit(ctx=other_tenant)
    folder = settings.artifacts_dir / job["id"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    with db() as s:
        crud.add_artifact(s, job["id"], folder / "config.json", 2, "0" * 64)
    up = client.post("/v1/files", files={"file": ("c.txt", io.BytesIO(b"hello"))},
                     headers=other_tenant.headers)
    assert up.status_code == 201
    url = path.format(job=job["id"], file=up.json()["id"])
    # JSON form of the events route: the SSE form of a queued job would not end.
    accept = {"Accept": "application/json"}
    owner = client.request(method, url, headers={**other_tenant.headers, **accept})
    assert owner.status_code in (200, 202), owner.text
    r = client.request(method, url, headers={**tenant.headers, **accept})
    assert r.status_code == 404, r.text


def test_other_tenants_file_cannot_be_used_as_calibration(client, tenant, other_tenant):
    up = client.post("/v1/files", files={"file": ("c.txt", io.BytesIO(b"hello"))},
                     headers=other_tenant.headers)
    body = {"model_id": "a/b", "target_ratio": 0.2, "calibration": {"source": up.json()["id"]}}
    r = client.post("/v1/jobs", json=body, headers=tenant.headers)
    assert r.status_code == 422 and "calibration.source" in r.json()["detail"]


def test_hub_tokens_are_per_tenant(client, tenant, other_tenant):
    assert client.put("/v1/hub-token", json={"token": "hf_abcdefghijk"},
                      headers=other_tenant.headers).status_code == 204
    assert client.get("/v1/hub-token", headers=tenant.headers).json()["configured"] is False
