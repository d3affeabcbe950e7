"""GET /v1/jobs/{id}/events: SSE from event rows, resumable, with heartbeats, ends with the job."""

from __future__ import annotations

import json
import threading
import time

import pytest

from app.crud import jobs as crud


def parse_sse(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        item: dict = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                item.setdefault("comment", line[1:].strip())
            else:
                k, _, v = line.partition(":")
                item[k] = v.lstrip(" ")
        out.append(item)
    return out


def _finished_job(submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w", 60)
        for i in range(3):
            crud.add_event(s, job["id"], phase="pruning", message=f"layer {i}", layer=i,
                           num_layers=3, percent=30.0 * (i + 1))
        crud.finish_job(s, job["id"], "succeeded", metrics={"ppl": 1.0})
    return job


def test_stream_delivers_every_event_in_order_and_ends(client, tenant, submit, db):
    job = _finished_job(submit, db)
    r = client.get(f"/v1/jobs/{job['id']}/events", headers=tenant.headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    items = [i for i in parse_sse(r.text) if "id" in i]
    seqs = [int(i["id"]) for i in items]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == 6  # accepted, claim, 3, final
    assert json.loads(items[-1]["data"])["state"] == "succeeded"
    assert items[-1]["event"] == "state"
    assert parse_sse(r.text)[-1]["event"] == "end"


def test_last_event_id_header_resumes_after_that_event(client, tenant, submit, db):
    job = _finished_job(submit, db)
    r = client.get(f"/v1/jobs/{job['id']}/events",
                   headers={**tenant.headers, "Last-Event-ID": "4"})
    seqs = [int(i["id"]) for i in parse_sse(r.text) if "id" in i]
    assert seqs == [5, 6]


def test_last_event_id_query_parameter_resumes_too(client, tenant, submit, db):
    job = _finished_job(submit, db)
    r = client.get(f"/v1/jobs/{job['id']}/events", params={"last_event_id": 5},
                   headers=tenant.headers)
    assert [int(i["id"]) for i in parse_sse(r.text) if "id" in i] == [6]


def test_bad_last_event_id_is_422(client, tenant, submit):
    job = submit()
    r = client.get(f"/v1/jobs/{job['id']}/events",
                   headers={**tenant.headers, "Last-Event-ID": "abc"})
    assert r.status_code == 422


def test_json_form_lists_events(client, tenant, submit, db):
    job = _finished_job(submit, db)
    r = client.get(f"/v1/jobs/{job['id']}/events",
                   headers={**tenant.headers, "Accept": "application/json"})
    events = r.json()
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[2]["layer"] == 0 and events[2]["phase"] == "pruning"


def test_live_stream_sends_heartbeats_and_new_events_then_ends(client, tenant, submit, db,
                                                               settings):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w", 60)

    def worker() -> None:
        time.sleep(settings.sse_heartbeat_s * 3)
        with db() as s:
            crud.add_event(s, job["id"], phase="pruning", message="layer 0", layer=0)
            crud.finish_job(s, job["id"], "cancelled")

    t = threading.Thread(target=worker)
    t.start()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=tenant.headers) as r:
        text = "".join(r.iter_text())
    t.join()
    items = parse_sse(text)
    assert any(i.get("comment") == "heartbeat" for i in items)
    assert [int(i["id"]) for i in items if "id" in i] == [1, 2, 3, 4]
    assert items[-1]["event"] == "end" and json.loads(items[-1]["data"])["state"] == "cancelled"


@pytest.mark.timeout(60)
def test_stream_ends_when_its_api_key_is_revoked(client, tenant, submit, db, settings):
    from app.crud.tenants import revoke_api_key

    job = submit()  # stays queued: only the revocation can end this stream

    def revoke() -> None:
        time.sleep(settings.sse_heartbeat_s * 2)
        with db() as s:
            revoke_api_key(s, tenant.key_id)

    t = threading.Thread(target=revoke)
    t.start()
    start = time.monotonic()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=tenant.headers) as r:
        text = "".join(r.iter_text())
    t.join()
    items = parse_sse(text)
    # Closed without `end` (the job did not end): a client reconnects and gets its 401.
    assert items[-1] == {"comment": "API key revoked"}
    assert not any(i.get("event") == "end" for i in items)
    assert time.monotonic() - start < settings.sse_heartbeat_s * 2 + 5
    assert client.get(f"/v1/jobs/{job['id']}/events", headers=tenant.headers).status_code == 401
