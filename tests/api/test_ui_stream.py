"""The tenant-wide event stream (/ui/stream with the session cookie, /v1/events with a key):
every event of the tenant's jobs once, in order, resumable, never another tenant's, and
nothing skipped when Postgres commits events out of id order."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import select

from app.crud import jobs as crud
from app.crud.tenants import revoke_api_key
from app.db.models import JobEvent
from app.streams import HOLE_WAIT_S, EventCursor, poll_events
from tests.api.ui_support import sign_in


def parse(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        item: dict = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                k, _, v = line.partition(":")
                item[k] = v.lstrip(" ")
        if "data" in item and item.get("event") == "job":
            item["data"] = json.loads(item["data"])
            out.append(item)
    return out


def _read(client, url: str, until_seqs: int, headers: dict | None = None,
          timeout: float = 10) -> list[dict]:
    """Read a stream until ``until_seqs`` job events arrived (the stream never ends itself)."""
    got: list[dict] = []
    buffer = ""
    deadline = time.monotonic() + timeout
    with client.stream("GET", url, headers=headers or {}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_text():
            buffer += chunk
            got = parse(buffer)
            if len(got) >= until_seqs or time.monotonic() > deadline:
                break
    return got


def _progress(db, job_id: str, n: int) -> None:
    with db() as s:
        crud.claim_job(s, job_id, "w", 60)
        for i in range(n):
            crud.add_event(s, job_id, phase="pruning", message=f"layer {i}", layer=i,
                           num_layers=n, percent=10.0 * (i + 1))


def test_one_stream_carries_every_job_of_the_tenant_and_none_of_others(
        app, tenant, other_tenant, submit, db):
    c = sign_in(app, tenant)
    with db() as s:
        start = int(s.scalar(select(JobEvent.id).order_by(JobEvent.id.desc()).limit(1)) or 0)
    a, b = submit(), submit()
    theirs = submit(ctx=other_tenant)
    _progress(db, theirs["id"], 3)
    _progress(db, a["id"], 2)
    _progress(db, b["id"], 2)
    events = _read(c, f"/ui/stream?after={start}", 2 * 4)  # accepted, claimed, 2 layers each
    jobs = [e["data"]["job_id"] for e in events]
    assert set(jobs) == {a["id"], b["id"]} and len(jobs) == 8
    assert [int(e["id"]) for e in events] == sorted(int(e["id"]) for e in events)
    last = events[-1]["data"]
    assert last["job"]["state"] == "running" and last["job"]["percent"] == 20.0
    assert last["job"]["model_id"] == b["model_id"] and last["job"]["num_layers"] == 2
    assert {"phase", "layer", "percent", "message", "metrics", "seq"} <= set(last)


def test_last_event_id_resumes_after_it(app, tenant, submit, db):
    c = sign_in(app, tenant)
    job = submit()
    _progress(db, job["id"], 3)
    with db() as s:
        ids = list(s.scalars(select(JobEvent.id).where(JobEvent.job_id == job["id"])
                            .order_by(JobEvent.id)))
    events = _read(c, "/ui/stream", 2, headers={"Last-Event-ID": str(ids[2])})
    assert [e["data"]["id"] for e in events] == ids[3:5]


def test_without_a_position_the_stream_starts_with_new_events(app, tenant, submit, db):
    c = sign_in(app, tenant)
    old = submit()
    _progress(db, old["id"], 2)
    fresh: dict = {}

    def later() -> None:
        time.sleep(0.3)
        fresh.update(submit())

    threading.Thread(target=later).start()
    events = _read(c, "/ui/stream", 1)
    assert events[0]["data"]["job_id"] == fresh["id"]


def test_one_job_filter(app, tenant, submit, db):
    c = sign_in(app, tenant)
    a, b = submit(), submit()
    _progress(db, a["id"], 2)
    _progress(db, b["id"], 2)
    events = _read(c, f"/ui/stream?job_id={b['id']}&after=0", 4)
    assert {e["data"]["job_id"] for e in events} == {b["id"]}


def test_the_stream_needs_a_session(app):
    from tests.api.ui_support import browser_client

    assert browser_client(app).get("/ui/stream").status_code == 401


def test_v1_events_streams_the_tenant_with_a_key(client, tenant, other_tenant, submit, db):
    a = submit()
    submit(ctx=other_tenant)
    _progress(db, a["id"], 1)
    events = _read(client, "/v1/events?after=0", 3, headers=tenant.headers)
    assert {e["data"]["job_id"] for e in events} == {a["id"]}
    assert client.get("/v1/events").status_code == 401


def test_revoking_the_key_ends_an_open_stream(app, tenant, submit, db):
    c = sign_in(app, tenant)
    submit()

    def revoke() -> None:
        time.sleep(0.2)
        with db() as s:
            revoke_api_key(s, tenant.key_id)

    with c.stream("GET", "/ui/stream?after=0") as r:
        assert r.status_code == 200
        threading.Thread(target=revoke).start()
        # Checked again every 2 x SLIMGPT_SSE_HEARTBEAT_S (0.3 s here): the stream ends.
        text = "".join(r.iter_text())
    assert "event: end" in text and "session ended" in text


# -- the cursor ---------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_cursor_remembers_skipped_ids_until_they_arrive_or_expire():
    clock = Clock()
    cursor = EventCursor(10, clock=clock)
    cursor.advance(11)
    cursor.advance(14)  # 12 and 13 not visible yet
    assert cursor.last == 14 and set(cursor.holes) == {12, 13}
    cursor.advance(12)  # committed late: delivered, no longer a hole
    assert set(cursor.holes) == {13}
    cursor.expire()
    assert set(cursor.holes) == {13}
    clock.t += HOLE_WAIT_S + 1  # rolled back: forgotten
    cursor.expire()
    assert cursor.holes == {}


def test_other_tenants_events_advance_the_cursor_without_being_sent(db, tenant, other_tenant,
                                                                     submit):
    with db() as s:
        cursor = EventCursor(int(s.scalar(select(JobEvent.id).order_by(JobEvent.id.desc())
                                          .limit(1)) or 0))
    theirs = submit(ctx=other_tenant)
    _progress(db, theirs["id"], 2)
    with db() as s:
        assert poll_events(s, tenant.tenant_id, cursor) == []
    assert cursor.holes == {}  # their ids are seen, not waited for
    with db() as s:
        assert cursor.last == s.scalar(select(JobEvent.id).order_by(JobEvent.id.desc()).limit(1))


def test_an_event_committed_late_with_a_smaller_id_is_still_delivered(settings, db, tenant,
                                                                      submit):
    """Postgres hands out ids at insert and shows rows at commit: a stream that already
    passed a larger id must still deliver the smaller one when it commits."""
    if settings.is_sqlite:
        pytest.skip("SQLite serializes writers: ids always commit in order")
    a, b = submit(), submit()
    with db() as s:
        cursor = EventCursor(int(s.scalar(select(JobEvent.id).order_by(JobEvent.id.desc())
                                          .limit(1))))
    slow = db()
    crud.claim_job(slow, a["id"], "w", 60)
    slow_event = JobEvent(job_id=a["id"], seq=100, state="running", phase="pruning",
                          message="late", layer=0)
    slow.add(slow_event)
    slow.flush()  # id taken, not committed
    with db() as s:
        crud.claim_job(s, b["id"], "w", 60)
        crud.add_event(s, b["id"], phase="pruning", message="early", layer=0)
    with db() as s:
        first = poll_events(s, tenant.tenant_id, cursor)
    assert "late" not in [e["message"] for e in first] and "early" in [e["message"] for e in first]
    slow.commit()
    slow.close()
    with db() as s:
        second = poll_events(s, tenant.tenant_id, cursor)
    assert [e["message"] for e in second] == ["late"]
    with db() as s:
        assert poll_events(s, tenant.tenant_id, cursor) == []


def test_a_busy_database_pauses_the_stream_instead_of_breaking_it(monkeypatch, settings, db,
                                                                  tenant, submit):
    """Once a stream has started it cannot become a 503: a locked (SQLite) or briefly
    unreachable database is retried at the next poll, and the stream goes on."""
    import asyncio

    from sqlalchemy.exc import OperationalError

    from app import streams

    job = submit()
    real = streams.poll_events
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OperationalError("SELECT", {}, Exception("database is locked"))
        return real(*args, **kwargs)

    monkeypatch.setattr(streams, "poll_events", flaky)

    async def first_event() -> str:
        async def never() -> bool:
            return False

        gen = streams.sse(session_factory=db, tenant_id=tenant.tenant_id, after=0,
                          poll_s=0.01, heartbeat_s=5, is_disconnected=never)
        async for chunk in gen:
            if chunk.startswith("id:"):
                await gen.aclose()
                return chunk
        return ""

    # A thread of its own: another test's Playwright may own this thread's event loop.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        chunk = pool.submit(asyncio.run, asyncio.wait_for(first_event(), 10)).result()
    assert calls["n"] == 3 and job["id"] in chunk
