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
from httpx_sse import ServerSentEvent, connect_sse
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK = 1024 * 1024


class ApiError(Exception):
    """The API answered with an error status (``status``), a message (``detail``) and, where it
    gave one, a stable machine-readable ``code`` and per-field ``errors``."""

    def __init__(self, status: int, detail: Any, *, method: str = "", url: str = "",
                 code: str | None = None, errors: list[dict[str, Any]] | None = None) -> None:
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url
        self.code = code
        self.errors = errors or []
        where = f" ({method} {url})" if method else ""
        super().__init__(f"HTTP {status}{where}: {detail}")


class ConnectionFailed(ApiError):
    """The server could not be reached (refused, DNS, timeout); ``status`` is 0."""

    def __init__(self, detail: str, *, method: str = "", url: str = "") -> None:
        super().__init__(0, detail, method=method, url=url, code="connection_failed")

    def __str__(self) -> str:
        return f"cannot reach the SlimGPT API at {self.url}: {self.detail}"


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: ``event`` is ``progress``, ``state`` (terminal) or ``end``."""

    id: int | None
    event: str
    data: dict[str, Any]


def _event(sse: ServerSentEvent) -> Event:
    try:
        parsed = json.loads(sse.data) if sse.data else {}
    except json.JSONDecodeError:
        parsed = {"raw": sse.data}
    return Event(int(sse.id) if sse.id and sse.id.isdigit() else None, sse.event or "message",
                 parsed if isinstance(parsed, dict) else {"value": parsed})


def _api_error(response: httpx.Response, method: str, url: str) -> ApiError:
    """An :class:`ApiError` from an error response: RFC 9457 problem details (``detail``,
    ``code``, ``errors``) or whatever body the server (or a proxy in front of it) sent."""
    try:
        body = response.json()
    except ValueError:
        return ApiError(response.status_code, response.text.strip() or response.reason_phrase,
                        method=method, url=url)
    if isinstance(body, dict) and "detail" in body:
        errors = body.get("errors")
        return ApiError(response.status_code, body["detail"], method=method, url=url,
                        code=body.get("code"), errors=errors if isinstance(errors, list) else None)
    return ApiError(response.status_code, body, method=method, url=url)


class _RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


#: Answers worth retrying: rate limited, or the server or a dependency briefly unavailable.
RETRY_STATUSES = (429, 502, 503, 504)
#: A ``Retry-After`` longer than this (a daily upload limit, say) is an error, not a wait.
MAX_RETRY_AFTER_S = 60.0


def _retry_after_s(exc: BaseException | None) -> float | None:
    """The server's ``Retry-After`` in seconds (this API sends seconds), if any."""
    if not isinstance(exc, _RetryableStatus):
        return None
    value = exc.response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


def _worth_retrying(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    after = _retry_after_s(exc)
    return isinstance(exc, _RetryableStatus) and (after is None or after <= MAX_RETRY_AFTER_S)


def _wait_retry_after(backoff: Any) -> Any:
    """tenacity wait: exponential backoff, or the server's ``Retry-After`` when it is longer
    (429 limits, 503 outages)."""

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return max(float(backoff(state)), _retry_after_s(exc) or 0.0)

    return wait


class SlimGPTClient:
    """Client of the ``/v1`` API. ``api_key`` is sent as ``Authorization: Bearer``.

    ``retries`` extra attempts are made on connection errors and 429/502/503/504, with
    exponential backoff from ``backoff_s`` or the server's ``Retry-After`` when longer; a
    ``Retry-After`` over :data:`MAX_RETRY_AFTER_S` is raised at once (a daily limit is no
    wait)."""

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
        headers = {"User-Agent": f"slimgpt-client/{_version()}"}
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

    def _retrying(self, attempts: int) -> Retrying:
        return Retrying(
            stop=stop_after_attempt(attempts),
            wait=_wait_retry_after(wait_exponential(multiplier=self.backoff_s, max=30.0)),
            retry=retry_if_exception(_worth_retrying),
            reraise=True,
        )

    def _request(self, method: str, path: str, *, retry: bool = True, **kw: Any) -> httpx.Response:
        def once() -> httpx.Response:
            response = self._http.request(method, path, **kw)
            if retry and response.status_code in RETRY_STATUSES:
                raise _RetryableStatus(response)
            return response

        try:
            response = self._retrying(self.retries + 1 if retry else 1)(once)
        except httpx.TransportError as err:
            raise ConnectionFailed(str(err) or type(err).__name__, method=method,
                                   url=self.base_url) from err
        except _RetryableStatus as err:
            response = err.response
        if response.status_code >= 400:
            raise _api_error(response, method, path)
        return response

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
        Returns the job (``id``, ``state``, ...). The ``Idempotency-Key`` (generated unless
        given) makes retries, and re-runs with the same key, return the same job."""
        return self.submit_job_or_replay(request, idempotency_key)[0]

    def submit_job_or_replay(self, request: Any, idempotency_key: str | None = None
                             ) -> tuple[dict[str, Any], bool]:
        """Like :meth:`submit_job`; also says whether the key had been used already, i.e. the
        API returned the existing job (``Idempotent-Replayed``) instead of creating one."""
        if hasattr(request, "model_dump"):
            body = request.model_dump(mode="json", exclude_unset=True)
        else:
            body = dict(request)
        key = idempotency_key or f"client-{uuid.uuid4()}"
        response = self._request("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
        return response.json(), response.headers.get("idempotent-replayed") == "true"

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
        """Live events over SSE (httpx-sse) until the job ends; the final ``end`` event is not
        yielded.

        A dropped connection is resumed with ``Last-Event-ID`` (the last id seen), so no event
        is lost or repeated; up to ``max_reconnects`` consecutive failures are tolerated."""
        url = f"/v1/jobs/{job_id}/events"
        last = last_event_id
        failures = 0
        while True:
            headers = {}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                with connect_sse(self._http, "GET", url, headers=headers,
                                 timeout=self._stream_timeout()) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise _api_error(source.response, "GET", url)
                    for sse in source.iter_sse():
                        failures = 0
                        if not sse.data:  # a `retry:`-only block: nothing to dispatch (WHATWG)
                            continue
                        event = _event(sse)
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

    def download_artifact(self, job_id: str, item: dict[str, Any],
                          dest_dir: str | os.PathLike[str]) -> Path:
        """Stream one artifact (an item of :meth:`list_artifacts`) into ``dest_dir``, keeping its
        sub-folder; written as ``.part``, SHA-256 checked, then renamed."""
        rel = PurePosixPath(item["name"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ApiError(0, f"refusing artifact name {item['name']!r}")
        target = Path(dest_dir).joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        sha = hashlib.sha256()
        url = f"/v1/jobs/{job_id}/artifacts/{rel}"
        try:
            with self._http.stream("GET", url) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _api_error(response, "GET", url)
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
        return target

    def download_artifacts(self, job_id: str, dest_dir: str | os.PathLike[str], *,
                           names: list[str] | None = None,
                           on_file: Callable[[str, int], None] | None = None) -> list[Path]:
        """Stream every artifact (or those in ``names``) into ``dest_dir``, keeping
        sub-folders and verifying each file's SHA-256."""
        Path(dest_dir).mkdir(parents=True, exist_ok=True)
        items = self.list_artifacts(job_id)
        if names is not None:
            known = {i["name"] for i in items}
            missing = [n for n in names if n not in known]
            if missing:
                raise ApiError(404, f"job {job_id} has no artifact {', '.join(missing)}",
                               code="not_found")
            items = [i for i in items if i["name"] in names]
        written = []
        for item in items:
            written.append(self.download_artifact(job_id, item, dest_dir))
            if on_file is not None:
                on_file(item["name"], int(item.get("size", 0)))
        return written

    # -- files ---------------------------------------------------------------------------------
    def upload_file(self, path: str | os.PathLike[str], *, format: str | None = None
                    ) -> dict[str, Any]:
        """POST /v1/files: stream a calibration/evaluation text or jsonl file; returns its
        record (``id``)."""
        p = Path(path)
        params: dict[str, Any] = {"filename": p.name}
        if format:
            params["format"] = format

        def chunks() -> Iterator[bytes]:
            with open(p, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        return self._json("POST", "/v1/files", params=params, content=chunks(), retry=False,
                          headers={"Content-Type": "text/plain; charset=utf-8",
                                   "Content-Length": str(p.stat().st_size)})

    def list_files(self, *, sha256: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The tenant's uploaded files, newest first (only those with this content hash)."""
        params: dict[str, Any] = {"limit": limit}
        if sha256:
            params["sha256"] = sha256
        return self._json("GET", "/v1/files", params=params)["items"]

    def get_file(self, file_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/files/{file_id}")

    def ensure_file(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """The uploaded file with ``path``'s content: an earlier upload (same SHA-256) is
        reused, so re-running a script does not upload, or change its job bodies, again."""
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        existing = self.list_files(sha256=digest.hexdigest(), limit=1)
        return existing[0] if existing else self.upload_file(path)

    # -- tokens, estimate, health --------------------------------------------------------------
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

    def ready(self) -> dict[str, Any]:
        """GET /readyz, ready or not (``status``, ``checks``); a 503 answer is returned too."""
        try:
            return self._json("GET", "/readyz", retry=False)
        except ApiError as err:
            if err.status == 503 and isinstance(err.detail, dict):
                return err.detail
            raise


def _version() -> str:
    try:
        from app import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"
