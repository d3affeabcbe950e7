"""Prometheus metrics (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _JobStateCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("slimgpt_jobs", "Jobs by state", labels=["state"])
        try:
            counts = self.counts()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is down
            counts = {}
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            family.add_metric([state], counts.get(state, 0))
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("slimgpt_http_requests", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("slimgpt_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry)
        self.jobs_submitted = Counter("slimgpt_jobs_submitted", "Jobs accepted by POST /v1/jobs",
                                      registry=self.registry)
        self.uploads = Counter("slimgpt_upload_bytes", "Bytes of accepted uploads",
                               registry=self.registry)

    def watch_job_states(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_JobStateCollector(counts))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
