"""A small typed Python client for the SlimGPT job API (torch-free; needs only httpx).

    from app.client import SlimGPTClient

    with SlimGPTClient("http://127.0.0.1:8000", api_key="sgk_...") as c:
        job = c.submit_job({"model_id": "HuggingFaceTB/SmolLM2-135M", "target_ratio": 0.2})
        for event in c.stream_events(job["id"]):
            print(event.data["message"])
        job = c.wait(job["id"])
        c.download_artifacts(job["id"], "out/")

Every method returns the API's JSON as plain dicts. Non-2xx answers raise :class:`ApiError`
(``status``, ``detail``); a server that cannot be reached raises :class:`ConnectionFailed`
(``status`` 0). Reads are retried on connection errors and on 429/502/503/504 (after the
server's ``Retry-After``, when it asks for at most a minute); ``submit_job`` always sends an
``Idempotency-Key`` (generated unless given), so its retries never create a second job.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK = 1024 * 1024


class ApiError(Exception):
    """The API answered with an error status (``status``) and a message (``detail``)."""

    def __init__(self, status: int, detail: Any, *, method: str = "", url: str = "") -> None:
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url
        where = f" ({method} {url})" if method else ""
        super().__init__(f"HTTP {status}{where}: {detail}")


class ConnectionFailed(ApiError):
    """The server could not be reached (refused, DNS, timeout); ``status`` is 0."""

    def __init__(self, detail: str, *, method: str = "", url: str = "") -> None:
        super().__init__(0, detail, method=method, url=url)

    def __str__(self) -> str:
        return f"cannot reach the SlimGPT API at {self.url}: {self.detail}"


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: ``event`` is ``progress``, ``state`` (terminal) or ``end``."""

    id: int | None
    event: str
    data: dict[str, Any]


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Parse an SSE line stream (comments and ``retry:`` ignored) into :class:`Event` objects."""
    ev_id: str | None = None
    ev_type = "message"
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                payload = "\n".join(data)
                try:
                    parsed = json.loads(payload)
                except json.JSONDecodeError:
                    parsed = {"raw": payload}
                yield Event(int(ev_id) if ev_id and ev_id.isdigit() else None, ev_type,
                            parsed if isinstance(parsed, dict) else {"value": parsed})
            ev_id, ev_type, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            ev_type = value
        elif field == "id":
            ev_id = value


def _detail(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return body["detail"]
    return body


#: Answers worth retrying: rate limited, or the server or a dependency briefly unavailable.
RETRY_STATUSES = (429, 502, 503, 504)
#: A ``Retry-After`` longer than this (a daily upload limit, say) is an error, not a wait.
MAX_RETRY_AFTER_S = 60.0


class SlimGPTClient:
    """Client of the ``/v1`` API. ``api_key`` is sent as ``Authorization: Bearer``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        retries: int = 3,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"User-Agent": "slimgpt-client/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout), transport=transport)

    # -- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SlimGPTClient:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, *, retry: bool = True, **kw: Any) -> httpx.Response:
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                response = self._http.request(method, path, **kw)
            except httpx.TransportError as err:
                if attempt + 1 >= attempts:
                    raise ConnectionFailed(str(err) or type(err).__name__, method=method,
                                           url=self.base_url) from err
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if response.status_code in RETRY_STATUSES and retry and attempt + 1 < attempts:
                delay = self._retry_delay(response, attempt)
                if delay is not None:
                    time.sleep(delay)
                    continue
            if response.status_code >= 400:
                raise ApiError(response.status_code, _detail(response), method=method, url=path)
            return response
        raise AssertionError("unreachable")

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying: the server's ``Retry-After`` when it sends one (429
        limits, 503 outages), else exponential backoff; None (give up now) when the server
        asks for more than :data:`MAX_RETRY_AFTER_S`."""
        backoff = self.backoff_s * 2**attempt
        value = response.headers.get("retry-after", "").strip()
        if not value.isdigit():  # absent, or an HTTP date (this API sends seconds)
            return backoff
        seconds = float(value)
        return None if seconds > MAX_RETRY_AFTER_S else max(seconds, backoff)

    def _stream_timeout(self) -> httpx.Timeout:
        # The server sends a heartbeat comment every SLIMGPT_SSE_HEARTBEAT_S (15 s): a read that
        # waits far longer than that means the connection is dead, and is resumed.
        connect = self._http.timeout.connect or 30.0
        return httpx.Timeout(connect, read=max(60.0, 2 * connect))

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        response = self._request(method, path, **kw)
        return response.json() if response.content else None

    # -- jobs ----------------------------------------------------------------------------------
    def submit_job(self, request: Any, idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/jobs. ``request`` is a dict or a pydantic model (e.g. ``app.schemas.JobCreate``).
        Returns the job (``id``, ``state``, ...)."""
        if hasattr(request, "model_dump"):
            body = request.model_dump(mode="json", exclude_unset=True)
        else:
            body = dict(request)
        key = idempotency_key or f"client-{uuid.uuid4()}"
        return self._json("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, *, state: str | None = None, model_id: str | None = None,
                  created_after: str | None = None, created_before: str | None = None,
                  page_size: int = 50, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Every matching job, newest first, following the cursor pages (at most ``limit``)."""
        params: dict[str, Any] = {"limit": page_size}
        for name, value in (("state", state), ("model_id", model_id),
                            ("created_after", created_after), ("created_before", created_before)):
            if value is not None:
                params[name] = value
        seen = 0
        while True:
            page = self._json("GET", "/v1/jobs", params=params)
            for item in page["items"]:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield item
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel", retry=False)

    def list_events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The job's events so far, as a JSON list (no streaming)."""
        return self._json("GET", f"/v1/jobs/{job_id}/events", params={"last_event_id": after},
                          headers={"Accept": "application/json"})

    def stream_events(self, job_id: str, last_event_id: int | None = None, *,
                      max_reconnects: int = 10) -> Iterator[Event]:
        """Live events over SSE until the job ends (the final ``end`` event is not yielded).

        A dropped connection is resumed with ``Last-Event-ID`` (the last id seen), so no event
        is lost or repeated; up to ``max_reconnects`` consecutive failures are tolerated."""
        last = last_event_id
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                       timeout=self._stream_timeout()) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError(response.status_code, _detail(response), method="GET",
                                       url=f"/v1/jobs/{job_id}/events")
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        if event.event == "end":
                            return
                        if event.id is not None:
                            last = event.id
                        yield event
            except httpx.TransportError as err:
                failures += 1
                if failures > max_reconnects:
                    raise ConnectionFailed(str(err) or type(err).__name__, method="GET",
                                           url=self.base_url) from err
                time.sleep(min(self.backoff_s * 2 ** (failures - 1), 5.0))
                continue
            # The stream closed without `end` (a proxy cut it): reconnect and resume.
            failures += 1
            if failures > max_reconnects:
                raise ConnectionFailed("event stream kept closing without an end event",
                                       method="GET", url=self.base_url)
            time.sleep(min(self.backoff_s, 1.0))

    def wait(self, job_id: str, *, poll_s: float = 1.0, timeout: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job is terminal; ``on_update`` gets every polled job. Returns the job.
        Raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll_s)

    # -- artifacts -----------------------------------------------------------------------------
    def list_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts")["items"]

    def download_artifacts(self, job_id: str, dest_dir: str | os.PathLike[str], *,
                           on_file: Callable[[str, int], None] | None = None) -> list[Path]:
        """Stream every artifact into ``dest_dir`` (keeping sub-folders), verifying each
        file's SHA-256; files are written as ``.part`` and renamed when complete."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for item in self.list_artifacts(job_id):
            rel = PurePosixPath(item["name"])
            if rel.is_absolute() or ".." in rel.parts:
                raise ApiError(0, f"refusing artifact name {item['name']!r}")
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            sha = hashlib.sha256()
            url = f"/v1/jobs/{job_id}/artifacts/{rel}"
            try:
                with self._http.stream("GET", url) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError(response.status_code, _detail(response), method="GET",
                                       url=url)
                    with open(tmp, "wb") as fh:
                        for chunk in response.iter_bytes(CHUNK):
                            sha.update(chunk)
                            fh.write(chunk)
            except httpx.TransportError as err:
                tmp.unlink(missing_ok=True)
                raise ConnectionFailed(str(err) or type(err).__name__, method="GET",
                                       url=self.base_url) from err
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if item.get("sha256") and sha.hexdigest() != item["sha256"]:
                tmp.unlink(missing_ok=True)
                raise ApiError(0, f"checksum mismatch for {item['name']}")
            os.replace(tmp, target)
            written.append(target)
            if on_file is not None:
                on_file(item["name"], int(item.get("size", 0)))
        return written

    # -- files, tokens, estimate, health --------------------------------------------------------
    def upload_file(self, path: str | os.PathLike[str], *, format: str | None = None
                    ) -> dict[str, Any]:
        """POST /v1/files: stream a calibration text or jsonl file; returns its record (``id``)."""
        p = Path(path)
        params: dict[str, Any] = {"filename": p.name}
        if format:
            params["format"] = format

        def chunks() -> Iterator[bytes]:
            with open(p, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        return self._json("POST", "/v1/files", params=params, content=chunks(), retry=False,
                          headers={"Content-Type": "application/octet-stream",
                                   "Content-Length": str(p.stat().st_size)})

    def set_hub_token(self, token: str) -> None:
        self._request("PUT", "/v1/hub-token", json={"token": token})

    def delete_hub_token(self) -> None:
        self._request("DELETE", "/v1/hub-token")

    def hub_token_status(self) -> dict[str, Any]:
        return self._json("GET", "/v1/hub-token")

    def estimate(self, request: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/estimate: ``{"config": {...} | "model_id": ..., "target_ratio": ...}``."""
        return self._json("POST", "/v1/estimate", json=request)

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")
