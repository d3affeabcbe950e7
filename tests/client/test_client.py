"""app.client.SlimGPTClient against a live server: jobs, pages, SSE with resume, artifacts."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from app.client import ApiError, ConnectionFailed, SlimGPTClient
from app.schemas import JobCreate

from .conftest import ARTIFACTS, free_port


def test_submit_wait_events_and_download(live_server, api_key, tmp_path):
    with SlimGPTClient(live_server.url, api_key, timeout=10) as c:
        job = c.submit_job(JobCreate(model_id="test/ok", target_ratio=0.2))
        assert job["state"] in ("queued", "running", "succeeded")
        seen = []
        done = c.wait(job["id"], poll_s=0.02, timeout=20, on_update=seen.append)
        assert done["state"] == "succeeded" and seen[-1]["state"] == "succeeded"
        assert done["metrics"]["params_after"] == 107_612_006
        events = list(c.stream_events(job["id"]))
        assert [e.id for e in events] == list(range(1, len(events) + 1))
        assert events[-1].event == "state" and events[-1].data["state"] == "succeeded"
        assert [e["seq"] for e in c.list_events(job["id"], after=3)] == \
            [e.id for e in events[3:]]
        assert sorted(a["name"] for a in c.list_artifacts(job["id"])) == sorted(ARTIFACTS)
        paths = c.download_artifacts(job["id"], tmp_path / "out")
    for name, data in ARTIFACTS.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert len(paths) == len(ARTIFACTS)
    assert not list((tmp_path / "out").rglob("*.part"))


def test_idempotency_key_returns_the_same_job_and_a_different_body_is_409(live_server, api_key):
    with SlimGPTClient(live_server.url, api_key) as c:
        a = c.submit_job({"model_id": "test/fail", "target_ratio": 0.2}, idempotency_key="k1")
        b = c.submit_job({"model_id": "test/fail", "target_ratio": 0.2}, idempotency_key="k1")
        assert a["id"] == b["id"]
        with pytest.raises(ApiError) as err:
            c.submit_job({"model_id": "test/fail", "target_ratio": 0.3}, idempotency_key="k1")
        assert err.value.status == 409 and "different request body" in str(err.value.detail)


def test_list_jobs_follows_cursor_pages(live_server):
    _, key = live_server.new_key()
    with SlimGPTClient(live_server.url, key) as c:
        ids = [c.submit_job({"model_id": "test/fail", "target_ratio": 0.1})["id"]
               for _ in range(5)]
        listed = [j["id"] for j in c.list_jobs(page_size=2)]
        assert listed == ids[::-1]
        assert len(list(c.list_jobs(page_size=2, limit=3))) == 3


def test_errors_carry_status_and_detail(live_server, api_key):
    with SlimGPTClient(live_server.url, api_key) as c:
        with pytest.raises(ApiError) as err:
            c.get_job("00000000-0000-0000-0000-000000000000")
        assert err.value.status == 404 and "not found" in err.value.detail
        with pytest.raises(ApiError) as err:
            c.submit_job({"model_id": "a/b", "target_ratio": 2})
        assert err.value.status == 422 and "target_ratio" in err.value.detail
    with SlimGPTClient(live_server.url, "sgk_wrong_key") as c, pytest.raises(ApiError) as err:
        c.get_job("x")
    assert err.value.status == 401
    dead = SlimGPTClient(f"http://127.0.0.1:{free_port()}", api_key, retries=0)
    with dead as c, pytest.raises(ConnectionFailed) as err:
        c.health()
    assert err.value.status == 0 and "cannot reach" in str(err.value)


class CutOnce(httpx.HTTPTransport):
    """Cuts the first SSE response after ``keep`` events, as a dropped connection would."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep
        self.cut = False
        self.last_event_ids: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if not request.url.path.endswith("/events"):
            return response
        self.last_event_ids.append(request.headers.get("last-event-id"))
        if self.cut:
            return response
        self.cut = True
        inner, keep = response.stream, self.keep

        class Cut(httpx.SyncByteStream):
            def __iter__(self):
                sent = 0
                buf = b""
                for chunk in inner:
                    buf += chunk
                    while b"\n\n" in buf:
                        block, buf = buf.split(b"\n\n", 1)
                        yield block + b"\n\n"
                        if block.startswith(b"id:"):
                            sent += 1
                            if sent >= keep:
                                raise httpx.RemoteProtocolError("peer closed connection")

            def close(self):
                inner.close()

        return httpx.Response(response.status_code, headers=response.headers, stream=Cut(),
                              request=request, extensions=response.extensions)


def test_stream_events_resumes_after_a_disconnect_without_loss_or_repeat(live_server, api_key):
    transport = CutOnce(keep=2)
    with SlimGPTClient(live_server.url, api_key, backoff_s=0.01, transport=transport) as c:
        job = c.submit_job({"model_id": "test/ok", "target_ratio": 0.2})
        seqs = [e.id for e in c.stream_events(job["id"])]
        final = c.get_job(job["id"])
    assert final["state"] == "succeeded"
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 7
    assert transport.last_event_ids[:2] == [None, "2"]


def test_upload_and_hub_token_and_estimate(live_server, api_key, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text\n" * 50)
    with SlimGPTClient(live_server.url, api_key) as c:
        f = c.upload_file(calib)
        assert f["size"] == calib.stat().st_size
        assert f["sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
        job = c.submit_job({"model_id": "test/fail", "target_ratio": 0.2,
                            "calibration": {"source": f["id"]}})
        assert job["request"]["calibration"]["source"] == f["id"]
        assert c.hub_token_status()["configured"] is False
        c.set_hub_token("hf_" + "x" * 20)
        assert c.hub_token_status()["configured"] is True
        c.delete_hub_token()
        plan = c.estimate({"config": {"model_type": "llama", "num_hidden_layers": 4,
                                      "hidden_size": 64, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "intermediate_size": 128,
                                      "vocab_size": 100}, "target_ratio": 0.2})
        assert plan["export_profile"] == "hetero"


def _answers(*responses: httpx.Response) -> tuple[httpx.MockTransport, list[float]]:
    """A transport that answers with ``responses`` in turn and records when it was called."""
    queue, times = list(responses), []

    def handler(request: httpx.Request) -> httpx.Response:
        import time

        times.append(time.monotonic())
        return queue.pop(0)

    return httpx.MockTransport(handler), times


def test_client_waits_the_retry_after_of_a_429_then_retries():
    transport, times = _answers(
        httpx.Response(429, headers={"Retry-After": "1"}, json={"detail": "rate limit"}),
        httpx.Response(200, json={"items": [], "next_cursor": None}))
    with SlimGPTClient("http://api.test", "sgk_a_b", backoff_s=0.01, transport=transport) as c:
        assert list(c.list_jobs()) == []
    assert len(times) == 2 and times[1] - times[0] >= 1.0


def test_client_gives_up_at_once_when_retry_after_is_far_away():
    transport, times = _answers(
        httpx.Response(429, headers={"Retry-After": "86400"}, json={"detail": "upload limit"}))
    with SlimGPTClient("http://api.test", "sgk_a_b", backoff_s=0.01, transport=transport) as c, \
            pytest.raises(ApiError) as err:
        c.get_job("00000000-0000-0000-0000-000000000000")
    assert err.value.status == 429 and len(times) == 1
