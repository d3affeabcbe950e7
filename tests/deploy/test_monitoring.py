"""The monitoring profile: Prometheus scrapes the two /metrics scopes the way the API expects,
Grafana is provisioned with that Prometheus and a dashboard whose every query names metrics
the service really exports (checked against a live scrape)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "slimgpt.json"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _mounts(service: dict) -> dict[str, str]:
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_prometheus_and_grafana_run_only_with_the_monitoring_profile(services):
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for published in services[name]["ports"]:
            assert published.startswith("127.0.0.1:")  # not on every interface by default


def test_the_config_files_the_services_mount_exist(services):
    for name in ("prometheus", "grafana"):
        for source in _mounts(services[name]).values():
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
    grafana = _mounts(services["grafana"])
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/slimgpt.yml").read_text())
    assert provider["providers"][0]["options"]["path"] in grafana
    env = services["grafana"]["environment"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(
        provider["providers"][0]["options"]["path"])


def test_prometheus_scrapes_each_replica_for_http_and_one_address_for_the_fleet(services):
    config = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    api, fleet = jobs["slimgpt-api"], jobs["slimgpt-fleet"]
    assert api["params"] == {"scope": ["process"]} and fleet["params"] == {"scope": ["fleet"]}
    assert api["dns_sd_configs"][0]["names"] == ["api"]  # every replica
    assert api["dns_sd_configs"][0]["port"] == 8000
    assert fleet["static_configs"][0]["targets"] == ["api:8000"]  # one address
    assert "/etc/prometheus/prometheus.yml" in _mounts(services["prometheus"])
    datasource = yaml.safe_load(
        (DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["uid"] == "slimgpt-prometheus"


def _exported_series(tmp_path: Path) -> set[str]:
    """Every sample name a scrape of a real app can carry (also for empty families)."""
    from cryptography.fernet import Fernet
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from app.core.config import Settings
    from app.main import create_app

    settings = Settings(data_dir=tmp_path, secret_key=Fernet.generate_key().decode(),
                        dispatcher_enabled=False, embedded_worker="")
    with TestClient(create_app(settings)) as c:
        c.get("/healthz")
        text = c.get("/metrics").text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",),
                    "info": ("_info",)}.get(family.type, ("",))
        names |= {family.name + s for s in suffixes}
    return names


def test_every_dashboard_query_uses_exported_metrics(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "slimgpt-overview"
    exported = _exported_series(tmp_path)
    used: set[str] = set()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "slimgpt-prometheus"
        for target in panel["targets"]:
            expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", target["expr"])  # label names
            used |= set(re.findall(r"\bslimgpt_[a-z_]+", expr))
    missing = used - exported
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    # The dashboard covers what the issue asks for.
    for name in ("slimgpt_jobs", "slimgpt_queue_depth", "slimgpt_job_queue_wait_seconds_bucket",
                 "slimgpt_job_duration_seconds_bucket",
                 "slimgpt_job_phase_duration_seconds_bucket", "slimgpt_job_failures_total",
                 "slimgpt_layers_pruned_total", "slimgpt_job_peak_gpu_memory_bytes_bucket",
                 "slimgpt_worker_last_heartbeat_timestamp_seconds", "slimgpt_worker_build_info",
                 "slimgpt_http_request_duration_seconds_bucket"):
        assert name in used, name
