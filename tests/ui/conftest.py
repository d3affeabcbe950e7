"""Browser tests: the real API (embedded mode, SQLite) served by uvicorn on a free port, a fake
runner that writes real progress rows, and Debian's Chromium driven by Playwright.

One browser for the whole session; each test gets a fresh context (cookies, viewport).
Screenshots go to ``SLIMGPT_TEST_ARTIFACTS_DIR`` (default ``out/ui-screenshots``, gitignored).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from app.core.config import Settings

from .progress_runner import make_runner

CHROMIUM = os.environ.get("SLIMGPT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
REPO_ROOT = Path(__file__).resolve().parents[2]
LAPTOP = {"width": 1366, "height": 768}
WALL = {"width": 2560, "height": 1440}
LAYERS = 8


@pytest.fixture(scope="session")
def shots_dir() -> Path:
    path = Path(os.environ.get("SLIMGPT_TEST_ARTIFACTS_DIR", REPO_ROOT / "out" / "ui-screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Tenant:
    name: str
    key: str
    key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class LiveServer:
    url: str
    settings: Settings
    a: Tenant
    b: Tenant
    http: httpx.Client = field(repr=False)

    def submit(self, tenant: Tenant, **body: Any) -> str:
        r = self.http.post("/v1/jobs", json={"target_ratio": 0.2, **body}, headers=tenant.headers)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def job(self, tenant: Tenant, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/jobs/{job_id}", headers=tenant.headers)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_state(self, tenant: Tenant, job_id: str, states: tuple[str, ...],
                   timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(tenant, job_id)
            if job["state"] in states:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not reach {states}: {job['state']}")


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from app.crud.tenants import create_api_key
    from app.db.migrate import upgrade
    from app.db.session import session_scope
    from app.main import create_app
    from tests.live_server import serve_in_thread

    base = tmp_path_factory.mktemp("ui-server")
    settings = Settings(data_dir=base, secret_key=Fernet.generate_key().decode(),
                        sse_poll_s=0.1, sse_heartbeat_s=2.0, worker_heartbeat_s=1.0)
    upgrade(str(settings.database_url))
    with session_scope(settings) as s:
        rec_a, key_a = create_api_key(s, "team-a", name="wall screen")
        rec_b, key_b = create_api_key(s, "team-b", name="team b")
    app = create_app(settings, runner=make_runner(settings, layers=LAYERS, delay_s=0.35,
                                                  slow_layers=60, slow_delay_s=0.4))
    with serve_in_thread(app, start_timeout_s=20) as url, \
            httpx.Client(base_url=url, timeout=10) as http:
        yield LiveServer(url, settings, Tenant("team-a", key_a, rec_a.id),
                         Tenant("team-b", key_b, rec_b.id), http)


@pytest.fixture(scope="session")
def browser(live_server: LiveServer) -> Iterator[Any]:
    """One Chromium for the session (started after the server, closed before it)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Visit:
    """A browser context for one test, recording every URL it requested."""

    page: Any
    urls: list[str]
    errors: list[str]
    server: LiveServer

    def go(self, path: str) -> None:
        self.page.goto(self.server.url + path)

    def sign_in(self, tenant: Tenant) -> None:
        self.go("/ui/jobs")
        self.page.wait_for_url("**/ui/login**")
        self.page.fill("#api_key", tenant.key)
        self.page.click("form[action='/ui/login'] button[type=submit]")
        self.page.wait_for_url("**/ui/jobs")


@pytest.fixture
def visit(browser: Any, live_server: LiveServer, request: pytest.FixtureRequest) -> Iterator[Visit]:
    viewport = getattr(request, "param", LAPTOP)
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    page = context.new_page()
    urls: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and
            "status of 4" not in m.text else None)
    try:
        yield Visit(page, urls, errors, live_server)
    finally:
        context.close()
    # Whatever the test did, no key ever travelled in a URL, and no script failed.
    for key in (live_server.a.key, live_server.b.key):
        leaked = [u for u in urls if key in u]
        assert not leaked, f"an API key appeared in a request URL: {leaked}"
    assert not errors, f"the page logged errors: {errors}"
