"""POST /v1/files: streamed to disk, size-limited, checked; usable as calibration.source."""

from __future__ import annotations

import io
import json
from pathlib import Path


def test_multipart_text_upload(client, tenant):
    r = client.post("/v1/files", files={"file": ("calib.txt", io.BytesIO(b"some text\n" * 10))},
                    headers=tenant.headers)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == "text" and body["size"] == 100 and len(body["sha256"]) == 64
    got = client.get(f"/v1/files/{body['id']}", headers=tenant.headers)
    assert got.status_code == 200 and got.json()["filename"] == "calib.txt"


def test_raw_jsonl_upload(client, tenant, settings):
    data = b"\n".join(json.dumps({"text": f"doc {i}"}).encode() for i in range(5)) + b"\n"
    r = client.post("/v1/files", params={"filename": "c.jsonl"}, content=data,
                    headers={**tenant.headers, "content-type": "application/x-ndjson"})
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "jsonl"
    stored = list(Path(settings.uploads_dir).glob(f"{r.json()['id']}*"))
    assert len(stored) == 1 and stored[0].read_bytes() == data


def test_oversize_upload_is_413_and_leaves_no_file(client, tenant, settings):
    before = set(Path(settings.uploads_dir).iterdir())
    big = b"x" * (settings.max_upload_bytes + 1)
    r = client.post("/v1/files", files={"file": ("big.txt", io.BytesIO(big))},
                    headers=tenant.headers)
    assert r.status_code == 413
    r2 = client.post("/v1/files", params={"filename": "big.txt"},
                     content=iter([big[:1000], big[1000:]]), headers=tenant.headers)
    assert r2.status_code == 413
    assert set(Path(settings.uploads_dir).iterdir()) == before


def test_invalid_jsonl_is_422(client, tenant):
    r = client.post("/v1/files", files={"file": ("c.jsonl", io.BytesIO(b'{"text": "a"}\nnope\n'))},
                    headers=tenant.headers)
    assert r.status_code == 422 and "line 2" in r.json()["detail"]


def test_jsonl_without_text_field_is_422(client, tenant):
    r = client.post("/v1/files", files={"file": ("c.jsonl", io.BytesIO(b'{"body": "a"}\n'))},
                    headers=tenant.headers)
    assert r.status_code == 422 and "text" in r.json()["detail"]


def test_non_utf8_upload_is_422(client, tenant):
    r = client.post("/v1/files", files={"file": ("c.txt", io.BytesIO(b"\xff\xfe\x00bad"))},
                    headers=tenant.headers)
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"]


def test_empty_upload_is_422(client, tenant):
    r = client.post("/v1/files", files={"file": ("c.txt", io.BytesIO(b""))}, headers=tenant.headers)
    assert r.status_code == 422


def test_raw_upload_without_a_filename_is_named_upload_txt(client, tenant):
    r = client.post("/v1/files", content=b"abc", headers=tenant.headers)
    assert r.status_code == 201 and r.json()["filename"] == "upload.txt"
    assert r.json()["format"] == "text"


def test_multipart_without_file_field_is_422(client, tenant):
    r = client.post("/v1/files", data={"other": "x"}, files={"x": ("a.txt", b"abc")},
                    headers=tenant.headers)
    assert r.status_code == 422


def test_uploaded_file_is_a_calibration_source(client, tenant, db):
    from app.db.models import Job

    up = client.post("/v1/files", files={"file": ("c.txt", io.BytesIO(b"calibration text"))},
                     headers=tenant.headers).json()
    r = client.post("/v1/jobs", json={"model_id": "a/b", "target_ratio": 0.2,
                                      "calibration": {"source": up["id"]},
                                      "evaluate": {"eval_source": up["id"]}},
                    headers=tenant.headers)
    assert r.status_code == 202, r.text
    with db() as s:
        job = s.get(Job, r.json()["id"])
        assert job.calibration_path and Path(job.calibration_path).read_text() == "calibration text"
        assert job.eval_path == job.calibration_path
