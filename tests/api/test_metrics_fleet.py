"""/metrics: Prometheus text that prometheus_client parses; job, queue and worker figures from
the database that move as jobs run and are identical on every replica; HTTP metrics by route
template with event streams kept out of the latency histogram."""

from __future__ import annotations

import uuid
from datetime import timedelta

from prometheus_client.parser import text_string_to_metric_families

from app.crud import jobs as crud
from app.crud.workers import WorkerInfo, heartbeat, register_worker, set_current_job
from app.db.base import utcnow
from app.db.models import Job, Worker
from app.fleet_metrics import error_code
from app.main import create_app


def scrape(client, scope: str | None = None) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from a parsed scrape."""
    r = client.get("/metrics" + (f"?scope={scope}" if scope else ""))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def _layer_events(db, job_id: str, n: int) -> None:
    with db() as s:
        for i in range(n):
            crud.add_event(s, job_id, phase="pruning", message=f"layer {i + 1}/{n} done",
                           layer=i, num_layers=n, metrics={"kind": "layer_done"})
        # a sub-layer progress event is not a pruned layer
        crud.add_event(s, job_id, phase="pruning", message="ffn", metrics={"kind": "ffn"})


def test_the_output_parses_and_follows_the_naming_conventions(client):
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in (("slimgpt_jobs", "gauge"), ("slimgpt_queue_depth", "gauge"),
                       ("slimgpt_job_queue_wait_seconds", "histogram"),
                       ("slimgpt_job_duration_seconds", "histogram"),
                       ("slimgpt_job_phase_duration_seconds", "histogram"),
                       ("slimgpt_job_failures", "counter"), ("slimgpt_layers_pruned", "counter"),
                       ("slimgpt_job_peak_gpu_memory_bytes", "histogram"),
                       ("slimgpt_worker_last_heartbeat_timestamp_seconds", "gauge"),
                       ("slimgpt_worker_build_info", "gauge"),
                       ("slimgpt_http_requests", "counter"),
                       ("slimgpt_http_request_duration_seconds", "histogram"),
                       ("slimgpt_api_build_info", "gauge")):
        assert families[name].type == kind, name
    assert "slimgpt_layers_pruned_total" in text and "slimgpt_job_failures_total" in text


def test_job_figures_change_as_jobs_run(client, tenant, submit, db):
    before = scrape(client, "fleet")
    job = submit()
    m = scrape(client, "fleet")
    assert value(m, "slimgpt_jobs", state="queued") == value(before, "slimgpt_jobs",
                                                              state="queued") + 1
    assert value(m, "slimgpt_queue_depth") == value(before, "slimgpt_queue_depth") + 1

    with db() as s:
        crud.claim_job(s, job["id"], "w", 60)
    m = scrape(client, "fleet")
    assert value(m, "slimgpt_job_queue_wait_seconds_count") == \
        value(before, "slimgpt_job_queue_wait_seconds_count") + 1
    assert value(m, "slimgpt_jobs", state="running") == value(before, "slimgpt_jobs",
                                                               state="running") + 1

    _layer_events(db, job["id"], 3)
    m = scrape(client, "fleet")
    assert value(m, "slimgpt_layers_pruned_total") == \
        value(before, "slimgpt_layers_pruned_total") + 3

    with db() as s:
        crud.finish_job(s, job["id"], "succeeded", metrics={
            "seconds": {"loading": 2.0, "pruning": 40.0, "bogus": 1.0},
            "peak_gpu_memory_bytes": 5 * 1024**3})
    m = scrape(client, "fleet")
    assert value(m, "slimgpt_job_duration_seconds_count", state="succeeded") == \
        value(before, "slimgpt_job_duration_seconds_count", state="succeeded") + 1
    assert value(m, "slimgpt_job_phase_duration_seconds_bucket", phase="pruning", le="60") == \
        value(before, "slimgpt_job_phase_duration_seconds_bucket", phase="pruning", le="60") + 1
    assert value(m, "slimgpt_job_phase_duration_seconds_bucket", phase="pruning", le="30") == \
        value(before, "slimgpt_job_phase_duration_seconds_bucket", phase="pruning", le="30")
    assert value(m, "slimgpt_job_peak_gpu_memory_bytes_bucket", le=str(8 * 1024**3)) == \
        value(before, "slimgpt_job_peak_gpu_memory_bytes_bucket", le=str(8 * 1024**3)) + 1
    assert value(m, "slimgpt_jobs", state="succeeded") == value(before, "slimgpt_jobs",
                                                                 state="succeeded") + 1
    # Counted once: scraping again adds nothing.
    assert scrape(client, "fleet")["slimgpt_job_duration_seconds_count"] == \
        m["slimgpt_job_duration_seconds_count"]


def test_failures_are_counted_by_error_code(client, submit, db):
    before = scrape(client, "fleet")
    for error, metrics in (("hub_unauthorized: token rejected", None),
                           ("anything at all", {"error_code": "cholesky_failed"}),
                           ("hub_unauthorized: again", None)):
        job = submit()
        with db() as s:
            crud.finish_job(s, job["id"], "failed", error=error, metrics=metrics)
    m = scrape(client, "fleet")
    assert value(m, "slimgpt_job_failures_total", code="hub_unauthorized") == \
        value(before, "slimgpt_job_failures_total", code="hub_unauthorized") + 2
    assert value(m, "slimgpt_job_failures_total", code="cholesky_failed") == \
        value(before, "slimgpt_job_failures_total", code="cholesky_failed") + 1


def test_error_codes_come_from_metrics_or_the_message_prefix():
    assert error_code("model_gated: accept the license") == "model_gated"
    assert error_code("whatever", {"error_code": "oom"}) == "oom"
    assert error_code("could not enqueue the job: ConnectionError") == "unknown"
    assert error_code(None) == "unknown"


def test_replicas_report_identical_fleet_figures(empty_database_url, tmp_path):
    """A replica that has scraped all along (incrementally) and one started now (reading the
    whole table) agree: the fleet scope is a function of the database alone. A private
    database, so no other test's rows change between the two scrapes."""
    from cryptography.fernet import Fernet
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.crud.tenants import create_api_key
    from app.db.migrate import upgrade
    from app.db.session import session_scope

    upgrade(empty_database_url)
    private = Settings(data_dir=tmp_path, database_url=empty_database_url, auto_migrate=False,
                       secret_key=Fernet.generate_key().decode(), dispatcher_enabled=False,
                       embedded_worker="")
    with session_scope(private) as s:
        _, key = create_api_key(s, "replicas")
    headers = {"Authorization": f"Bearer {key}"}
    old = TestClient(create_app(private))
    ids = []
    for outcome in ("succeeded", "failed", "cancelled", None):
        r = old.post("/v1/jobs", json={"model_id": "a/b", "target_ratio": 0.2}, headers=headers)
        ids.append(r.json()["id"])
        with session_scope(private) as s:
            crud.claim_job(s, ids[-1], "w", 60)
        scrape(old, "fleet")
        _layer_events(lambda: session_scope(private), ids[-1], 2)
        if outcome:
            with session_scope(private) as s:
                crud.finish_job(s, ids[-1], outcome, error="oom: x" if outcome == "failed"
                                else None, metrics={"seconds": {"pruning": 3.0}})
        scrape(old, "fleet")
    fresh = TestClient(create_app(private))

    def comparable(c) -> dict:
        m = scrape(c, "fleet")
        m.pop("slimgpt_queue_oldest_job_age_seconds", None)  # depends on the clock
        return m

    a, b = comparable(old), comparable(fresh)
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert value(a, "slimgpt_layers_pruned_total") == 8
    assert value(a, "slimgpt_job_failures_total", code="oom") == 1
    for c in (old, fresh):
        c.close()
    from app.db import session as db_session

    engine = db_session._engines.pop(empty_database_url, None)
    if engine is not None:
        engine.dispose()


def test_a_job_finishing_with_an_older_timestamp_is_still_counted(client, submit, db):
    """Late commits and worker clock skew: a job whose finished_at is older than the newest
    one already seen (within the overlap window) is counted on the next scrape, once."""
    newer, older = submit(), submit()
    with db() as s:
        crud.finish_job(s, newer["id"], "failed", error="a_code: x")
    before = scrape(client, "fleet")
    with db() as s:
        crud.finish_job(s, older["id"], "failed", error="late_code: y")
        s.get(Job, older["id"]).finished_at = utcnow() - timedelta(minutes=3)
        s.commit()
    m = scrape(client, "fleet")
    assert value(m, "slimgpt_job_failures_total", code="late_code") == \
        value(before, "slimgpt_job_failures_total", code="late_code") + 1
    again = scrape(client, "fleet")
    assert value(again, "slimgpt_job_failures_total", code="late_code") == \
        value(m, "slimgpt_job_failures_total", code="late_code")


def test_scopes_split_process_and_fleet_metrics(client):
    process, fleet = scrape(client, "process"), scrape(client, "fleet")
    assert "slimgpt_http_requests_total" in process and "slimgpt_jobs" not in process
    assert "slimgpt_jobs" in fleet and "slimgpt_http_requests_total" not in fleet
    both = scrape(client)
    assert set(process) | set(fleet) == set(both) | (set(process) - set(both))
    assert client.get("/metrics?scope=nope").status_code == 422


def test_workers_appear_with_heartbeat_build_and_liveness(client, db, settings, submit):
    wid = f"gpu0@host-{uuid.uuid4().hex[:6]}"
    job = submit()
    with db() as s:
        register_worker(s, WorkerInfo(id=wid, kind="celery", host="host-a", pid=42,
                                      queue="slimgpt", gpu_name="NVIDIA H200", gpu_count=2,
                                      gpu_memory_bytes=None,
                                      build={"slimgpt_service": "0.1.0", "torch": "2.11.0"}))
        crud.claim_job(s, job["id"], wid, 60)
        set_current_job(s, wid, job["id"])
    m = scrape(client, "fleet")
    labels = {"worker": wid, "host": "host-a", "kind": "celery"}
    assert value(m, "slimgpt_worker_up", **labels) == 1
    assert value(m, "slimgpt_worker_busy", **labels) == 1
    assert value(m, "slimgpt_worker_gpus", **labels, gpu="NVIDIA H200") == 2
    assert value(m, "slimgpt_worker_build_info", **labels, slimgpt_service="0.1.0",
                 torch="2.11.0") == 1
    beat = value(m, "slimgpt_worker_last_heartbeat_timestamp_seconds", **labels)
    assert abs(beat - utcnow().timestamp()) < 60
    # Silent for more than three heartbeats: down.
    with db() as s:
        s.get(Worker, wid).last_heartbeat_at = utcnow() - timedelta(
            seconds=4 * settings.worker_heartbeat_s)
        s.commit()
    assert value(scrape(client, "fleet"), "slimgpt_worker_up", **labels) == 0
    with db() as s:
        heartbeat(s, wid)
    assert value(scrape(client, "fleet"), "slimgpt_worker_up", **labels) == 1


def test_http_metrics_use_route_templates(app, client, tenant, submit):
    from tests.api.ui_support import sign_in

    job = submit()
    client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers)
    ui = sign_in(app, tenant)
    ui.get(f"/ui/jobs/{job['id']}")
    ui.get("/ui/static/app.css")
    client.get("/no/such/page")
    too_big = client.post("/v1/jobs", content=b"x" * 100_000, headers=tenant.headers)
    assert too_big.status_code == 413  # refused before routing, still labelled by its route
    requests = scrape(client, "process")["slimgpt_http_requests_total"]
    routes = {dict(k)["route"] for k in requests}
    assert {"/v1/jobs/{job_id}", "/ui/jobs/{job_id}", "/ui/static/{path}", "/ui/login",
            "unmatched"} <= routes
    assert not [r for r in routes if job["id"] in r]
    labels = {(dict(k)["route"], dict(k)["status"]) for k in requests}
    assert ("/v1/jobs", "413") in labels
    assert {status for route, status in labels if route == "unmatched"} == {"404"}


def test_event_streams_stay_out_of_the_latency_histogram(client, tenant, submit, db):
    job = submit()
    with db() as s:
        crud.finish_job(s, job["id"], "cancelled")
    route = "/v1/jobs/{job_id}/events"
    labels = {"method": "GET", "route": route}
    before = scrape(client, "process")
    r = client.get(f"/v1/jobs/{job['id']}/events", headers=tenant.headers)
    assert r.headers["content-type"].startswith("text/event-stream")
    m = scrape(client, "process")
    assert value(m, "slimgpt_http_requests_total", **labels, status="200") == \
        value(before, "slimgpt_http_requests_total", **labels, status="200") + 1
    assert value(m, "slimgpt_http_request_duration_seconds_count", **labels) == \
        value(before, "slimgpt_http_request_duration_seconds_count", **labels)
    assert value(m, "slimgpt_http_streams_open", route=route) == 0  # it ended
    # The same route answering JSON is a normal request, timed as usual.
    client.get(f"/v1/jobs/{job['id']}/events",
               headers={**tenant.headers, "Accept": "application/json"})
    assert value(scrape(client, "process"), "slimgpt_http_request_duration_seconds_count",
                 **labels) == value(m, "slimgpt_http_request_duration_seconds_count", **labels) + 1
