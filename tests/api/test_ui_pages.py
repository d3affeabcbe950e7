"""Dashboard pages, server side: what each page shows, tenant isolation, paging and filters,
the submit form's API-identical validation, cancel, downloads, the fleet page, headers."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from app.crud import jobs as crud
from app.crud.workers import WorkerInfo, register_worker, set_current_job
from app.db.models import Job
from tests.api.conftest import JOB
from tests.api.ui_support import browser_client, csrf_of, sign_in


def _page_data(html: str, element_id: str) -> dict:
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', html,
                  re.DOTALL)
    assert m is not None
    return json.loads(m.group(1))


def _run_layers(db, job_id: str, layers: int, *, finish: str | None = "succeeded") -> None:
    with db() as s:
        crud.claim_job(s, job_id, "w1", 60)
        crud.add_event(s, job_id, phase="loading", message="loading", percent=0.0)
        crud.add_event(s, job_id, phase="pruning", message="pruning", percent=10.0,
                       num_layers=layers)
        for i in range(layers):
            crud.add_event(s, job_id, phase="pruning", message=f"layer {i + 1}/{layers} done",
                           layer=i, num_layers=layers, percent=10 + 75 * (i + 1) / layers,
                           metrics={"kind": "layer_done", "heads_kept": 9.0 - i % 3,
                                    "channels_kept": 1536.0 - 8 * i, "attn_error": 0.01 * (i + 1),
                                    "ffn_error": 0.1 * (i + 1)})
        if finish:
            crud.finish_job(s, job_id, finish, metrics={
                "params_before": 134_515_008, "params_after": 107_612_006,
                "perplexity_before": 24.41, "perplexity_after": 32.9,
                "peak_gpu_memory_bytes": 2 * 1024**3,
                "seconds": {"loading": 1.5, "pruning": 30.0}},
                error="cholesky_failed: not positive definite" if finish == "failed" else None)


def test_the_root_and_dashboard_paths_lead_to_the_jobs_page(app):
    c = browser_client(app)
    for path in ("/", "/dashboard", "/ui", "/ui/"):
        r = c.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", path


def test_jobs_page_shows_the_tenants_jobs_with_submitter_and_target(app, tenant, submit):
    job = submit({"model_id": "HuggingFaceTB/SmolLM2-135M", "target_ratio": 0.35})
    html = sign_in(app, tenant).get("/ui/jobs").text
    row = html[html.index(f'data-job-id="{job["id"]}"'):]
    row = row[:row.index("</tr>")]
    assert "HuggingFaceTB/SmolLM2-135M" in row and "35%" in row and "queued" in row
    assert tenant.key_id in row  # submitted by (the key has no name: its id)
    assert f'/ui/jobs/{job["id"]}' in row


def test_another_tenants_jobs_never_show(app, tenant, other_tenant, submit):
    theirs = submit({"model_id": "secret-org/secret-model", "target_ratio": 0.2},
                    ctx=other_tenant)
    c = sign_in(app, tenant)
    assert "secret-model" not in c.get("/ui/jobs").text
    assert "secret-model" not in c.get("/ui/jobs?model=secret").text
    r = c.get(f"/ui/jobs/{theirs['id']}", headers={"Accept": "text/html"})
    assert r.status_code == 404 and "not found" in r.text and "secret" not in r.text
    assert c.get(f"/ui/submit?from={theirs['id']}").status_code == 404
    assert c.get(f"/ui/jobs/{theirs['id']}/artifacts/config.json").status_code == 404
    assert c.post(f"/ui/jobs/{theirs['id']}/cancel",
                  data={"csrf_token": csrf_of(c)}).status_code == 404
    assert c.get(f"/ui/stream?job_id={theirs['id']}").status_code == 404
    fleet = c.get("/ui/fleet").text
    assert theirs["id"] not in fleet


def _insert_jobs(db, tenant_id: str, n: int, *, model: str = "org/model", state: str = "queued",
                 start: datetime | None = None) -> list[str]:
    start = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
    ids = []
    with db() as s:
        for i in range(n):
            job = Job(id=str(uuid.uuid4()), tenant_id=tenant_id, state=state, model_id=model,
                      request={"model_id": model, "target_ratio": 0.2}, phase="queued",
                      created_at=start + timedelta(minutes=i))
            s.add(job)
            ids.append(job.id)
        s.commit()
    return ids


def test_paging_through_hundreds_of_jobs(app, tenant, db):
    ids = _insert_jobs(db, tenant.tenant_id, 230)
    c = sign_in(app, tenant)
    first = c.get("/ui/jobs").text
    assert "230 jobs · page 1 of 5" in first
    shown = re.findall(r'<tr data-job-id="([0-9a-f-]{36})"', first)
    assert shown == list(reversed(ids))[:50]  # newest first
    last = c.get("/ui/jobs?page=5").text
    assert re.findall(r'<tr data-job-id="([0-9a-f-]{36})"', last) == list(reversed(ids))[200:]
    assert 'rel="prev"' in last and 'rel="next"' not in last
    # Every job is on exactly one page.
    seen = []
    for page in range(1, 6):
        seen += re.findall(r'<tr data-job-id="([0-9a-f-]{36})"', c.get(f"/ui/jobs?page={page}").text)
    assert sorted(seen) == sorted(ids)
    assert "page 5 of 5" in c.get("/ui/jobs?page=99").text  # past the end: the last page
    assert 'href="/ui/jobs?model=org&amp;page=2"' in c.get("/ui/jobs?model=org").text


def test_filters_by_state_model_and_dates(app, tenant, db):
    day = datetime(2026, 3, 10, 12, tzinfo=timezone.utc)
    old = _insert_jobs(db, tenant.tenant_id, 2, model="org/llama-a", start=day - timedelta(days=5))
    new = _insert_jobs(db, tenant.tenant_id, 3, model="org/qwen-b", start=day)
    done = _insert_jobs(db, tenant.tenant_id, 1, model="org/qwen-b", state="succeeded", start=day)
    c = sign_in(app, tenant)

    def ids(query: str) -> set[str]:
        return set(re.findall(r'<tr data-job-id="([0-9a-f-]{36})"', c.get(f"/ui/jobs?{query}").text))

    assert ids("model=QWEN") == set(new + done)  # contains, case-insensitive
    assert ids("model=qwen&state=succeeded") == set(done)
    assert ids("from=2026-03-10&to=2026-03-10") == set(new + done)  # "to" includes the day
    assert ids("to=2026-03-06") == set(old)


def test_bad_filter_values_are_reported_not_a_500(app, tenant):
    r = sign_in(app, tenant).get("/ui/jobs?state=exploded&from=yesterday&page=x")
    assert r.status_code == 200
    assert "unknown state" in r.text and "not a date" in r.text


def test_the_submit_form_rejects_exactly_what_the_api_rejects(app, tenant, client):
    c = sign_in(app, tenant)
    token = csrf_of(c)
    for body in ({"model_id": "HuggingFaceTB/SmolLM2-135M", "target_ratio": 1.5},
                 {"model_id": "x/y", "target_ratio": 0.2, "calibration": {"num_samples": "many"}},
                 {"model_id": "x/y", "target_ratio": 0.2, "surprise": True},
                 {"model_id": "x/y", "target_ratio": 0.2,
                  "destination": {"hub_repo_id": "team/model"}},
                 {"model_id": "x/y", "target_ratio": 0.2, "export": {"profile": "uniform"},
                  "schedule": "log"}):
        ui = c.post("/ui/jobs", json=body, headers={"X-CSRF-Token": token})
        api = client.post("/v1/jobs", json=body, headers=tenant.headers)
        assert api.status_code == 422, body
        assert (ui.status_code, ui.json()) == (api.status_code, api.json()), body


def test_submitting_from_the_form_records_who_submitted(app, tenant, db):
    c = sign_in(app, tenant)
    r = c.post("/ui/jobs", json={"model_id": "org/m", "target_ratio": 0.2},
               headers={"X-CSRF-Token": csrf_of(c), "Idempotency-Key": "form-1"})
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert r.json()["url"] == f"/ui/jobs/{job_id}"
    with db() as s:
        assert s.get(Job, job_id).submitted_by == tenant.key_id
    # A double click sends the same idempotency key: one job.
    again = c.post("/ui/jobs", json={"model_id": "org/m", "target_ratio": 0.2},
                   headers={"X-CSRF-Token": csrf_of(c), "Idempotency-Key": "form-1"})
    assert again.json()["id"] == job_id


def test_submit_similar_prefills_the_form_from_a_job(app, tenant, submit):
    job = submit({"model_id": "org/model-x", "target_ratio": 0.3, "schedule": [0.1, 0.2, 0.3],
                  "pruning": {"alpha": 0.5, "gqa_policy": "group", "preset": "quality"},
                  "calibration": {"source": "wikitext2", "num_samples": 64}})
    html = sign_in(app, tenant).get(f"/ui/submit?from={job['id']}").text
    assert 'value="org/model-x"' in html and 'value="0.3"' in html and 'value="64"' in html
    assert 'value="wikitext2"' in html
    assert re.search(r'<option value="group"\s+selected>', html)
    assert re.search(r'<option value="quality"\s+selected>', html)
    advanced = re.search(r'<textarea id="f-advanced"[^>]*>(.*?)</textarea>', html, re.DOTALL)
    extra = json.loads(advanced.group(1).replace("&#34;", '"'))
    assert extra["schedule"] == [0.1, 0.2, 0.3] and extra["pruning"]["alpha"] == 0.5


def test_job_page_shows_layers_timeline_figures_and_artifacts(app, tenant, submit, db, settings):
    job = submit()
    _run_layers(db, job["id"], 6)
    folder = settings.artifacts_dir / job["id"] / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    with db() as s:
        crud.add_artifact(s, job["id"], folder / "config.json", 8,
                          hashlib.sha256(b'{"a": 1}').hexdigest())
    c = sign_in(app, tenant)
    html = c.get(f"/ui/jobs/{job['id']}").text
    data = _page_data(html, "job-data")
    assert [p["layer"] for p in data["layers"]] == list(range(6))
    assert data["layers"][2] == {"layer": 2, "heads_kept": 7.0, "channels_kept": 1520.0,
                                 "attn_error": 0.03, "ffn_error": pytest.approx(0.3)}
    phases = re.findall(r'class="span phase-(\w+)', html)
    assert phases == ["queued", "loading", "pruning"]
    assert "134.52 M → 107.61 M" in html and "24.41 → 32.9" in html and "2.0 GiB" in html
    assert f'href="/ui/jobs/{job["id"]}/artifacts/model/config.json"' in html
    download = c.get(f"/ui/jobs/{job['id']}/artifacts/model/config.json")
    assert download.status_code == 200 and download.content == b'{"a": 1}'
    assert 'id="cancel-button"' not in html  # finished: nothing to cancel
    assert f'/ui/submit?from={job["id"]}' in html
    assert "Open on the Hub" not in html  # published locally only


def test_job_page_names_the_preset_beside_the_schedule(app, tenant, submit):
    """A quality job's widths come from its sensitivity curves, not the schedule alone."""
    quality = submit({**JOB, "pruning": {"preset": "quality"}})
    standard = submit()
    c = sign_in(app, tenant)
    assert "log · hetero · preset quality" in c.get(f"/ui/jobs/{quality['id']}").text
    assert "· preset" not in c.get(f"/ui/jobs/{standard['id']}").text


def test_job_page_names_the_worker_that_ran_it_after_the_worker_let_go(app, tenant, submit,
                                                                        db):
    """A worker names its job only while it runs it (its heartbeat lets go of a finished
    one); the page then names the process that last held the job's lease."""
    job = submit()
    with db() as s:
        claimed, why = crud.try_claim(s, job["id"], "gpu-host-7:4242:ab12cd34", 60.0)
        assert claimed is not None, why
        crud.finish_job(s, job["id"], "succeeded", result={})
    html = sign_in(app, tenant).get(f"/ui/jobs/{job['id']}").text
    worker = html[html.index("<dt>Worker</dt>"):]
    worker = worker[:worker.index("</dd>")]
    assert "gpu-host-7:4242:ab12cd34" in worker and "last held it" in worker


def test_hub_links_are_shown_only_for_http_urls(app, tenant, submit, db):
    good, bad = submit(), submit()
    with db() as s:
        crud.finish_job(s, good["id"], "succeeded", result={
            "hub_url": "https://huggingface.co/team/model-slim",
            "hub_pr_url": "https://huggingface.co/team/model-slim/discussions/1"})
        crud.finish_job(s, bad["id"], "succeeded", result={"hub_url": "javascript:alert(1)"})
    c = sign_in(app, tenant)
    html = c.get(f"/ui/jobs/{good['id']}").text
    assert 'href="https://huggingface.co/team/model-slim"' in html and "Hub pull request" in html
    assert "javascript:" not in c.get(f"/ui/jobs/{bad['id']}").text


def test_cancel_from_the_job_page(app, tenant, submit, db):
    queued, running = submit(), submit()
    with db() as s:
        crud.claim_job(s, running["id"], "w", 60)
    c = sign_in(app, tenant)
    token = csrf_of(c)
    r = c.post(f"/ui/jobs/{queued['id']}/cancel", data={"csrf_token": token})
    assert r.headers["location"] == f"/ui/jobs/{queued['id']}?notice=cancelled"
    r = c.post(f"/ui/jobs/{running['id']}/cancel", data={"csrf_token": token})
    assert r.headers["location"] == f"/ui/jobs/{running['id']}?notice=cancel_requested"
    assert "Cancel requested" in c.get(r.headers["location"]).text
    with db() as s:
        assert s.get(Job, queued["id"]).state == "cancelled"
        assert s.get(Job, running["id"]).cancel_requested
        crud.finish_job(s, running["id"], "succeeded")
    r = c.post(f"/ui/jobs/{running['id']}/cancel", data={"csrf_token": token})
    assert "nothing%20to%20cancel" in r.headers["location"]
    assert "nothing to cancel" in c.get(r.headers["location"]).text


def test_fleet_page_shows_workers_queue_and_failures_by_code(app, tenant, other_tenant, submit,
                                                              db, settings):
    mine, theirs = submit(), submit(ctx=other_tenant)
    failed_a, failed_b = submit(), submit()
    _run_layers(db, failed_a["id"], 2, finish="failed")
    _run_layers(db, failed_b["id"], 2, finish="failed")
    host = f"gpu-{uuid.uuid4().hex[:6]}"
    with db() as s:
        for name, job in (("w-mine", mine), ("w-theirs", theirs)):
            register_worker(s, WorkerInfo(id=f"{name}@{host}", kind="celery", host=host, pid=1,
                                          queue="slimgpt", gpu_name="NVIDIA H200", gpu_count=1,
                                          gpu_memory_bytes=141 * 1024**3,
                                          build={"slimgpt_service": "0.1.0"}))
            crud.claim_job(s, job["id"], name, 60)
            set_current_job(s, f"{name}@{host}", job["id"])
    html = sign_in(app, tenant).get("/ui/fleet").text
    mine_row = html[html.index(f'data-worker-id="w-mine@{host}"'):]
    assert mine["id"][:8] in mine_row[:mine_row.index("</tr>")]
    assert "1 × NVIDIA H200" in mine_row
    theirs_row = html[html.index(f'data-worker-id="w-theirs@{host}"'):]
    theirs_row = theirs_row[:theirs_row.index("</tr>")]
    assert "another tenant's job" in theirs_row and theirs["id"] not in html
    assert re.search(r"<code>cholesky_failed</code></td><td class=\"num\">2</td>", html)
    partial = sign_in(app, tenant).get("/ui/fleet?partial=1").text
    assert "<html" not in partial and "Workers" in partial


def test_pages_forbid_inline_script_framing_and_caching(app, tenant):
    r = sign_in(app, tenant).get("/ui/jobs")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert r.headers["cache-control"] == "no-store" and r.headers["x-frame-options"] == "DENY"
    assert "<script>" not in r.text  # no inline script


def test_static_files_come_from_the_package_and_nothing_from_elsewhere(app, tenant):
    c = sign_in(app, tenant)
    html = "".join(c.get(p).text for p in ("/ui/jobs", "/ui/submit", "/ui/fleet"))
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and not [r for r in refs if r.startswith(("http:", "https:", "//"))]
    for ref in {r for r in refs if r.startswith("/ui/static/")}:
        assert re.search(r"\?v=[0-9a-f]{10}$", ref)
        r = c.get(ref)
        assert r.status_code == 200 and len(r.content) > 100, ref
