"""Job and worker metrics computed from Postgres at scrape time (the ``fleet`` scope of /metrics).

Why Postgres and not an endpoint on each worker: workers already write every figure the
dashboard shows into the job database (events, job rows, the ``workers`` table), GPU hosts are
often not reachable from Prometheus, and a Celery worker runs each job in a fresh child process
whose in-memory counters would die with it. Reading the database makes the figures exactly the
ones the dashboard shows.

Why this is correct with several API replicas: every value here is a pure function of the
database, so each replica reports the same numbers. Scrape this scope through one address
(``/metrics?scope=fleet`` on the service name, as docker/prometheus/prometheus.yml does) and the
per-replica HTTP metrics with ``?scope=process`` on every replica; nothing is counted twice.

Counters and histograms over finished jobs are kept incrementally: each scrape reads only the
jobs that finished (started) since the previous one, plus an overlap window for late commits
and clock skew between workers, de-duplicated by id; pruned layers are counted in the database
on the first scrape, then followed by event id (with the stream's hole tracking for ids that
commit late). A replica that starts later rebuilds the same totals on its first scrape.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.crud.workers import FORGET_AFTER, worker_status
from app.db.base import utcnow
from app.db.models import JOB_STATES, TERMINAL_STATES, Job, JobEvent, Worker
from app.streams import SCAN, EventCursor

log = logging.getLogger("slimgpt.metrics")

PHASES = ("loading", "calibrating", "pruning", "verifying", "evaluating", "publishing")
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
PHASE_BUCKETS = (0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
GIB = 1024**3
GPU_MEMORY_BUCKETS = tuple(int(g * GIB) for g in (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 141,
                                                  192))
#: Re-read rows this far behind the newest one seen (late commits, worker clock skew).
TIME_OVERLAP = timedelta(minutes=10)
_ERROR_CODE = re.compile(r"^([a-z][a-z0-9_]{1,63}):")


def error_code(error: str | None, metrics: dict[str, Any] | None = None) -> str:
    """The machine-readable code of a failed job: ``metrics.error_code``, else the ``code:``
    prefix of its error message, else ``unknown``."""
    code = (metrics or {}).get("error_code") if isinstance(metrics, dict) else None
    if isinstance(code, str) and code:
        return code
    m = _ERROR_CODE.match(error or "")
    return m.group(1) if m else "unknown"


class _Histogram:
    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * len(self.bounds)
        self.total = 0
        # In millionths, as an integer: exact, so the sum does not depend on the order in
        # which rows were read and every replica reports the same digits.
        self._sum_micro = 0

    @property
    def sum(self) -> float:
        return self._sum_micro / 1e6

    def observe(self, value: float) -> None:
        self.total += 1
        self._sum_micro += round(value * 1e6)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append((_fmt(bound), running))
        out.append(("+Inf", self.total))
        return out


def _fmt(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else repr(bound)


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return max(0.0, (b - a).total_seconds())


@dataclass
class _Incremental:
    """Totals over rows already seen, and what is needed to read only new ones."""

    high_water: datetime | None = None
    seen: dict[str, datetime] = field(default_factory=dict)

    def floor(self, now: datetime) -> datetime | None:
        # Capped at our own clock: a worker whose clock runs ahead must not push the window
        # past rows that other workers are still writing.
        return None if self.high_water is None else min(self.high_water, now) - TIME_OVERLAP

    def take(self, row_id: str, at: datetime) -> bool:
        """True the first time a row is offered."""
        if row_id in self.seen:
            return False
        self.seen[row_id] = at
        if self.high_water is None or at > self.high_water:
            self.high_water = at
        return True

    def forget_old(self, now: datetime) -> None:
        floor = self.floor(now)
        if floor is not None:
            self.seen = {k: v for k, v in self.seen.items() if v >= floor}


class FleetCollector(Collector):
    """Prometheus collector over the job database (see the module docstring)."""

    def __init__(self, session_factory: Callable[[], Session], heartbeat_s: float,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.session_factory = session_factory
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self._lock = threading.Lock()
        self._started = _Incremental()
        self._finished = _Incremental()
        self._events: EventCursor | None = None
        self.queue_wait = _Histogram(QUEUE_WAIT_BUCKETS)
        self.duration: dict[str, _Histogram] = {
            state: _Histogram(DURATION_BUCKETS) for state in sorted(TERMINAL_STATES)}
        self.phases: dict[str, _Histogram] = {p: _Histogram(PHASE_BUCKETS) for p in PHASES}
        self.gpu_memory = _Histogram(GPU_MEMORY_BUCKETS)
        self.failures: dict[str, int] = defaultdict(int)
        self.layers_pruned = 0

    # -- reading ------------------------------------------------------------------------------
    def _read_started(self, s: Session, now: datetime) -> None:
        stmt = select(Job.id, Job.created_at, Job.started_at).where(Job.started_at.is_not(None))
        floor = self._started.floor(now)
        if floor is not None:
            stmt = stmt.where(Job.started_at >= floor)
        for job_id, created, started in s.execute(stmt):
            if self._started.take(job_id, started):
                wait = _seconds(created, started)
                if wait is not None:
                    self.queue_wait.observe(wait)
        self._started.forget_old(now)

    def _read_finished(self, s: Session, now: datetime) -> None:
        stmt = select(Job.id, Job.state, Job.started_at, Job.finished_at, Job.error,
                      Job.metrics["seconds"], Job.metrics["peak_gpu_memory_bytes"],
                      Job.metrics["error_code"]).where(Job.finished_at.is_not(None))
        floor = self._finished.floor(now)
        if floor is not None:
            stmt = stmt.where(Job.finished_at >= floor)
        for job_id, state, started, finished, error, seconds, peak, code in s.execute(stmt):
            if not self._finished.take(job_id, finished):
                continue
            duration = _seconds(started, finished)
            if duration is not None:
                self.duration[state].observe(duration)
            if isinstance(seconds, dict):
                for phase, value in seconds.items():
                    if phase in self.phases and isinstance(value, (int, float)):
                        self.phases[phase].observe(float(value))
            if isinstance(peak, (int, float)) and peak > 0:
                self.gpu_memory.observe(float(peak))
            if state == "failed":
                self.failures[error_code(error, {"error_code": code})] += 1
        self._finished.forget_old(now)

    def _read_layers(self, s: Session) -> None:
        layer_done = (JobEvent.phase == "pruning") & JobEvent.layer.is_not(None) & (
            JobEvent.metrics["kind"].as_string() == "layer_done")
        if self._events is None:
            # First scrape of this replica: count in the database, then follow new ids.
            newest = int(s.scalar(select(func.max(JobEvent.id))) or 0)
            self.layers_pruned = int(s.scalar(select(func.count()).select_from(JobEvent).where(
                layer_done, JobEvent.id <= newest)) or 0)
            self._events = EventCursor(newest)
            return
        while True:
            ids = self._events.new_ids(s, SCAN)
            if ids:
                self.layers_pruned += int(s.scalar(select(func.count()).select_from(JobEvent)
                                                   .where(JobEvent.id.in_(ids), layer_done)) or 0)
            if len(ids) < SCAN:
                return

    # -- collecting ---------------------------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        with self._lock:
            try:
                with self.session_factory() as s:
                    snapshot = self._snapshot(s)
                    s.rollback()
            except Exception:
                log.warning("fleet metrics: the database could not be read", exc_info=True)
                snapshot = None
            up = GaugeMetricFamily("slimgpt_metrics_database_up",
                                   "1 if the job database could be read for this scrape")
            up.add_metric([], 0 if snapshot is None else 1)
            yield up
            if snapshot is None:
                return
            yield from snapshot

    def _snapshot(self, s: Session) -> list[Metric]:
        now = self.clock()
        counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        oldest = s.scalar(select(func.min(Job.created_at)).where(Job.state == "queued"))
        workers = list(s.execute(
            select(Worker, Job.state).outerjoin(Job, Job.id == Worker.current_job_id)
            .where(Worker.last_heartbeat_at >= now - FORGET_AFTER)).tuples())
        self._read_started(s, now)
        self._read_finished(s, now)
        self._read_layers(s)

        out: list[Metric] = []
        jobs = GaugeMetricFamily("slimgpt_jobs", "Jobs by state", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        out.append(jobs)
        out.append(GaugeMetricFamily("slimgpt_queue_depth", "Jobs waiting for a worker",
                                     value=counts.get("queued", 0)))
        out.append(GaugeMetricFamily(
            "slimgpt_queue_oldest_job_age_seconds", "Age of the oldest queued job (0: none)",
            value=_seconds(oldest, now) or 0.0))
        out.append(self._histogram("slimgpt_job_queue_wait_seconds",
                                   "Time from submission to the first start of a job",
                                   {(): self.queue_wait}))
        out.append(self._histogram("slimgpt_job_duration_seconds",
                                   "Run time of finished jobs (first start to end) by final state",
                                   {(k,): v for k, v in sorted(self.duration.items())},
                                   labels=["state"]))
        out.append(self._histogram("slimgpt_job_phase_duration_seconds",
                                   "Time finished jobs spent in each phase",
                                   {(k,): v for k, v in self.phases.items()}, labels=["phase"]))
        out.append(self._histogram("slimgpt_job_peak_gpu_memory_bytes",
                                   "Peak GPU memory of a finished job (largest on one GPU)",
                                   {(): self.gpu_memory}))
        failures = CounterMetricFamily("slimgpt_job_failures", "Failed jobs by error code",
                                       labels=["code"])
        for code, n in sorted(self.failures.items()):
            failures.add_metric([code], n)
        out.append(failures)
        out.append(CounterMetricFamily("slimgpt_layers_pruned",
                                       "Decoder layers pruned by all jobs (resumed layers once)",
                                       value=self.layers_pruned))
        out.extend(self._worker_families(workers, now))
        return out

    def _histogram(self, name: str, doc: str, series: dict[tuple[str, ...], _Histogram],
                   labels: list[str] | None = None) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=labels or [])
        for label_values, h in series.items():
            family.add_metric(list(label_values), h.buckets(), h.sum)
        return family

    def _worker_families(self, workers: list[tuple[Worker, str | None]],
                         now: datetime) -> list[Metric]:
        labels = ["worker", "host", "kind"]
        up = GaugeMetricFamily("slimgpt_worker_up",
                               "1 while the worker's heartbeat is fresh", labels=labels)
        busy = GaugeMetricFamily("slimgpt_worker_busy", "1 while the worker runs a job",
                                 labels=labels)
        beat = GaugeMetricFamily("slimgpt_worker_last_heartbeat_timestamp_seconds",
                                 "Unix time of the worker's last heartbeat", labels=labels)
        started = GaugeMetricFamily("slimgpt_worker_start_time_seconds",
                                    "Unix time the worker process started", labels=labels)
        gpus = GaugeMetricFamily("slimgpt_worker_gpus", "GPUs the worker may use",
                                 labels=labels + ["gpu"])
        build = InfoMetricFamily("slimgpt_worker_build", "Versions a worker runs",
                                 labels=labels)
        by_status: dict[str, int] = {k: 0 for k in ("busy", "idle", "lost", "stopped")}
        for w, job_state in workers:
            key = [w.id, w.host, w.kind]
            status = worker_status(w, self.heartbeat_s, now, job_state)
            by_status[status] += 1
            up.add_metric(key, 1 if status in ("busy", "idle") else 0)
            busy.add_metric(key, 1 if status == "busy" else 0)
            beat.add_metric(key, w.last_heartbeat_at.timestamp())
            started.add_metric(key, w.started_at.timestamp())
            gpus.add_metric(key + [w.gpu_name or "none"], w.gpu_count)
            build.add_metric(key, {k: str(v) for k, v in sorted((w.build or {}).items())
                                   if k not in labels})
        counts = GaugeMetricFamily("slimgpt_workers", "Workers by status", labels=["status"])
        for status, n in by_status.items():
            counts.add_metric([status], n)
        return [counts, up, busy, beat, started, gpus, build]
