"""A minimal Hub HTTP API on 127.0.0.1, recording every request, for testing publishers.

It answers the endpoints ``HfApi.create_repo`` and ``HfApi.create_commit`` use, as the real Hub
does for small files (every file uploaded inline, "regular" mode), and can be scripted to fail
a route N times first.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

COMMIT_SHA = "fedcba9876543210fedcba9876543210fedcba98"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


@dataclass
class FakeHubState:
    requests: list[Recorded] = field(default_factory=list)
    # route name -> responses (status, headers) to give before behaving normally
    failures: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    base_url: str = ""

    def route(self, name: str) -> list[Recorded]:
        return [r for r in self.requests if _route(r.method, r.path) == name]


def _route(method: str, path: str) -> str:
    if method == "POST" and path == "/api/repos/create":
        return "create_repo"
    if method == "POST" and path == "/api/validate-yaml":
        return "validate_yaml"
    if method == "POST" and path.startswith("/api/models/") and "/preupload/" in path:
        return "preupload"
    if method == "POST" and path.startswith("/api/models/") and "/commit/" in path:
        return "commit"
    if method == "GET" and path.startswith("/api/models/"):
        return "repo_info"
    return "unknown"


def _handler(state: FakeHubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            url = urlsplit(self.path)
            rec = Recorded(self.command, url.path, parse_qs(url.query),
                           {k.lower(): v for k, v in self.headers.items()},
                           self._body())
            state.requests.append(rec)
            name = _route(rec.method, rec.path)
            pending = state.failures.get(name)
            if pending:
                status, headers = pending.pop(0)
                self._send(status, {"error": f"scripted {status}"}, headers)
                return
            if name == "create_repo":
                body = rec.json()
                repo = f"{body['organization']}/{body['name']}"
                self._send(200, {"url": f"{state.base_url}/{repo}", "name": repo})
            elif name == "validate_yaml":
                self._send(200, {"errors": [], "warnings": []})
            elif name == "preupload":
                files = rec.json()["files"]
                self._send(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                    for f in files
                ]})
            elif name == "commit":
                repo = rec.path.removeprefix("/api/models/").split("/commit/")[0]
                pr = "create_pr" in rec.query
                self._send(200, {
                    "commitUrl": f"{state.base_url}/{repo}/commit/{COMMIT_SHA}",
                    "commitOid": COMMIT_SHA,
                    "pullRequestUrl": f"{state.base_url}/{repo}/discussions/1" if pr else None,
                })
            elif name == "repo_info":
                repo = rec.path.removeprefix("/api/models/")
                self._send(200, {"id": repo, "sha": COMMIT_SHA, "private": True, "siblings": []})
            else:
                self._send(404, {"error": "not faked"})

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle

    return Handler


@contextmanager
def fake_hub() -> Iterator[FakeHubState]:
    """Serve a fake Hub on an ephemeral 127.0.0.1 port for the duration of the block."""
    state = FakeHubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def committed_files(commit: Recorded) -> list[tuple[str, bytes]]:
    """(path, content) of each file in a recorded commit, in commit order."""
    out = []
    for item in commit.ndjson():
        if item["key"] == "file":
            value = item["value"]
            out.append((value["path"], base64.b64decode(value["content"])))
    return out
