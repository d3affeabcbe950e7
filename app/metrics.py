"""Prometheus metrics. Two scopes, one registry each (so several apps can live in one process):

* ``process``: what this API replica did itself — HTTP requests by route template, open event
  streams, accepted jobs and uploads, build info. Scrape every replica.
* ``fleet``: jobs, queue and workers, read from the job database (:mod:`app.fleet_metrics`);
  identical on every replica. Scrape it once, through any replica.

``GET /metrics`` serves both; ``?scope=process`` or ``?scope=fleet`` serves one.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from sqlalchemy.orm import Session

from app import __version__
from app.fleet_metrics import FleetCollector

SCOPES = ("process", "fleet")
#: Request latency buckets (seconds): API calls and page renders, not streams.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # process scope
        self.fleet_registry = CollectorRegistry()
        self.requests = Counter("slimgpt_http_requests", "HTTP requests by route template",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "slimgpt_http_request_duration_seconds",
            "HTTP request latency by route template (event streams are not included)",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.streams = Gauge("slimgpt_http_streams_open", "Server-Sent Event streams now open",
                             ["route"], registry=self.registry)
        self.jobs_submitted = Counter("slimgpt_jobs_submitted", "Jobs accepted by this replica",
                                      registry=self.registry)
        self.uploads = Counter("slimgpt_upload_bytes", "Bytes of accepted uploads",
                               registry=self.registry)
        Info("slimgpt_api_build", "Versions this API replica runs",
             registry=self.registry).info({"version": __version__,
                                           "python": platform.python_version()})
        self.fleet: FleetCollector | None = None

    def watch_fleet(self, session_factory: Callable[[], Session], heartbeat_s: float) -> None:
        self.fleet = FleetCollector(session_factory, heartbeat_s)
        self.fleet_registry.register(self.fleet)

    def observe_request(self, method: str, route: str, status: int, seconds: float,
                        *, stream: bool = False) -> None:
        self.requests.labels(method, route, str(status)).inc()
        if not stream:  # a stream's duration is how long someone watched, not latency
            self.latency.labels(method, route).observe(seconds)

    def exposition(self, scope: str | None = None) -> bytes:
        """The text format for ``scope`` (None: both)."""
        parts = []
        if scope in (None, "process"):
            parts.append(generate_latest(self.registry))
        if scope in (None, "fleet"):
            parts.append(generate_latest(self.fleet_registry))
        return b"".join(parts)
