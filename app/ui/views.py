"""What the dashboard pages show, read from the job database (no HTTP here).

Functions return ORM rows for templates: they never roll back (that would expire the rows);
callers close the session before rendering, which keeps SQLite's lock short."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.crud.workers import list_workers_with_jobs, worker_status
from app.db.base import utcnow
from app.db.models import JOB_STATES, ApiKey, Artifact, Job, JobEvent, Worker
from app.fleet_metrics import error_code

PER_PAGE = 50
TIMELINE_PHASES = ("queued", "loading", "calibrating", "pruning", "verifying", "evaluating",
                   "publishing")
EVENT_LOG_LIMIT = 1000


# -- jobs list ---------------------------------------------------------------------------------
@dataclass
class JobFilters:
    state: str | None = None
    model: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    page: int = 1
    errors: list[str] = field(default_factory=list)

    def query(self, **override: Any) -> dict[str, str]:
        """The filters as query parameters (for links to other pages of the same list)."""
        values = {"state": self.state, "model": self.model,
                  "from": self.date_from.isoformat() if self.date_from else None,
                  "to": self.date_to.isoformat() if self.date_to else None, "page": self.page}
        values.update(override)
        return {k: str(v) for k, v in values.items()
                if v not in (None, "") and not (k == "page" and v == 1)}

    @property
    def active(self) -> bool:
        return any((self.state, self.model, self.date_from, self.date_to))


def parse_filters(params: Any) -> JobFilters:
    """Filters from the query string; a bad value is ignored and reported, never a 500."""
    f = JobFilters()
    state = (params.get("state") or "").strip()
    if state:
        if state in JOB_STATES:
            f.state = state
        else:
            f.errors.append(f"unknown state {state!r}")
    model = (params.get("model") or "").strip()
    f.model = model[:512] or None
    for name, attr in (("from", "date_from"), ("to", "date_to")):
        raw = (params.get(name) or "").strip()
        if raw:
            try:
                setattr(f, attr, date.fromisoformat(raw))
            except ValueError:
                f.errors.append(f"{name}: not a date (YYYY-MM-DD)")
    try:
        f.page = max(1, min(100_000, int(params.get("page") or 1)))
    except ValueError:
        f.errors.append("page: not a number")
    return f


@dataclass
class JobPage:
    rows: list[Job]
    total: int
    page: int
    pages: int
    models: list[str]
    key_names: dict[str, str]
    counts: dict[str, int]


def list_jobs(s: Session, tenant_id: str, f: JobFilters, per_page: int = PER_PAGE) -> JobPage:
    where = [Job.tenant_id == tenant_id]
    if f.state:
        where.append(Job.state == f.state)
    if f.model:
        where.append(Job.model_id.icontains(f.model, autoescape=True))
    if f.date_from:
        where.append(Job.created_at >= datetime.combine(f.date_from, time(), timezone.utc))
    if f.date_to:  # inclusive: the whole day
        where.append(Job.created_at < datetime.combine(f.date_to + timedelta(days=1), time(),
                                                       timezone.utc))
    total = int(s.scalar(select(func.count()).select_from(Job).where(*where)) or 0)
    pages = max(1, math.ceil(total / per_page))
    page = min(f.page, pages)
    rows = list(s.scalars(select(Job).where(*where)
                          .order_by(Job.created_at.desc(), Job.id.desc())
                          .offset((page - 1) * per_page).limit(per_page)))
    models = list(s.scalars(select(Job.model_id).where(Job.tenant_id == tenant_id)
                            .group_by(Job.model_id).order_by(Job.model_id).limit(200)))
    return JobPage(rows=rows, total=total, page=page, pages=pages, models=models,
                   key_names=key_names(s, tenant_id), counts=job_counts(s, tenant_id))


def job_counts(s: Session, tenant_id: str) -> dict[str, int]:
    counts = dict(s.execute(select(Job.state, func.count()).where(Job.tenant_id == tenant_id)
                            .group_by(Job.state)).all())
    return {state: int(counts.get(state, 0)) for state in JOB_STATES}


def key_names(s: Session, tenant_id: str) -> dict[str, str]:
    """``key id -> label`` for the tenant's keys (the "submitted by" column)."""
    return {k: (name or k) for k, name in s.execute(
        select(ApiKey.id, ApiKey.name).where(ApiKey.tenant_id == tenant_id))}


# -- one job -----------------------------------------------------------------------------------
@dataclass
class PhaseSpan:
    phase: str
    start: datetime
    end: datetime | None
    seconds: float
    current: bool


def timeline(job: Job, events: list[JobEvent], now: datetime | None = None) -> list[PhaseSpan]:
    """Each phase the job went through, in order, with its duration (the runner's own
    per-phase seconds where it reported them, else the time between events)."""
    now = now or utcnow()
    starts: list[tuple[str, datetime]] = [("queued", job.created_at)]
    seen = {"queued"}
    for ev in events:
        if ev.phase in TIMELINE_PHASES and ev.phase not in seen:
            seen.add(ev.phase)
            starts.append((ev.phase, ev.time))
    reported = (job.metrics or {}).get("seconds") or {}
    spans = []
    for i, (phase, start) in enumerate(starts):
        if i + 1 < len(starts):
            end: datetime | None = starts[i + 1][1]
        elif phase == "queued":
            end = job.started_at or job.finished_at
        else:
            end = job.finished_at
        if phase == "queued" and job.started_at is not None:
            end = job.started_at
        seconds = ((end or now) - start).total_seconds()
        if isinstance(reported.get(phase), (int, float)):
            seconds = float(reported[phase])
        spans.append(PhaseSpan(phase, start, end, max(0.0, seconds),
                               current=end is None and not job.is_terminal))
    return spans


def layer_series(events: list[JobEvent]) -> list[dict[str, Any]]:
    """One point per pruned layer from the ``layer_done`` progress events (a resumed job's
    layers appear once)."""
    by_layer: dict[int, dict[str, Any]] = {}
    for ev in events:
        m = ev.metrics
        if ev.layer is None or not isinstance(m, dict) or m.get("kind") != "layer_done":
            continue
        by_layer[int(ev.layer)] = {
            "layer": int(ev.layer),
            "heads_kept": m.get("heads_kept"),
            "channels_kept": m.get("channels_kept"),
            "attn_error": m.get("attn_error"),
            "ffn_error": m.get("ffn_error"),
        }
    return [by_layer[i] for i in sorted(by_layer)]


@dataclass
class JobView:
    job: Job
    events: list[JobEvent]
    events_truncated: bool
    artifacts: list[Artifact]
    spans: list[PhaseSpan]
    layers: list[dict[str, Any]]
    duration_s: float | None
    submitted_by: str | None
    worker: Worker | None
    last_event_id: int


def job_view(s: Session, job: Job, last_event_id: int) -> JobView:
    """``last_event_id``: the newest event id read *before* the job row, so the page's stream
    (which starts after it) cannot miss an event that landed while the page was read."""
    total = int(s.scalar(select(func.count()).select_from(JobEvent)
                         .where(JobEvent.job_id == job.id)) or 0)
    events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job.id)
                            .order_by(JobEvent.seq)))
    artifacts = list(s.scalars(select(Artifact).where(Artifact.job_id == job.id)
                               .order_by(Artifact.name)))
    worker = s.scalars(select(Worker).where(Worker.current_job_id == job.id)).first()
    names = key_names(s, job.tenant_id)
    duration = None
    if job.started_at is not None:
        duration = ((job.finished_at or utcnow()) - job.started_at).total_seconds()
    return JobView(
        job=job, events=events[-EVENT_LOG_LIMIT:], events_truncated=total > EVENT_LOG_LIMIT,
        artifacts=artifacts, spans=timeline(job, events), layers=layer_series(events),
        duration_s=duration,
        submitted_by=names.get(job.submitted_by or "", job.submitted_by),
        worker=worker, last_event_id=last_event_id)


# -- queue and fleet ---------------------------------------------------------------------------
def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class FailureGroup:
    code: str
    count: int
    last_at: datetime
    example_job_id: str
    example_error: str


@dataclass
class WorkerRow:
    worker: Worker
    status: str
    job: Job | None  # only the viewer's own jobs are shown
    busy_elsewhere: bool


@dataclass
class FleetView:
    counts: dict[str, int]
    queue_depth: int
    oldest_queued_s: float | None
    wait_p50: float | None
    wait_p90: float | None
    wait_max: float | None
    waits_counted: int
    workers: list[WorkerRow]
    failures: list[FailureGroup]
    running: list[Job]


def fleet_view(s: Session, tenant_id: str, heartbeat_s: float,
               now: datetime | None = None) -> FleetView:
    now = now or utcnow()
    counts = job_counts(s, tenant_id)
    # Depth and age are fleet-wide (everyone's jobs share the workers); they name no job.
    depth = int(s.scalar(select(func.count()).select_from(Job).where(Job.state == "queued"))
                or 0)
    oldest = s.scalar(select(func.min(Job.created_at)).where(Job.state == "queued"))
    waits = [(started - created).total_seconds() for created, started in s.execute(
        select(Job.created_at, Job.started_at).where(
            Job.tenant_id == tenant_id, Job.started_at >= now - timedelta(days=1)))]
    workers = []
    for w, job in list_workers_with_jobs(s):
        status = worker_status(w, heartbeat_s, now, job.state if job is not None else None)
        if status != "busy":
            job = None  # an ended job the heartbeat has not let go of yet
        own = job is not None and job.tenant_id == tenant_id
        workers.append(WorkerRow(worker=w, status=status, job=job if own else None,
                                 busy_elsewhere=job is not None and not own))
    failed = s.execute(select(Job.id, Job.error, Job.metrics["error_code"], Job.finished_at)
                       .where(Job.tenant_id == tenant_id, Job.state == "failed",
                              Job.finished_at >= now - timedelta(days=7))
                       .order_by(Job.finished_at.desc())).all()
    groups: dict[str, FailureGroup] = {}
    for job_id, error, code, finished in failed:
        key = error_code(error, {"error_code": code})
        if key in groups:
            groups[key].count += 1
        else:
            message = (error or "").removeprefix(f"{key}: ")
            groups[key] = FailureGroup(key, 1, finished, job_id, message)
    running = list(s.scalars(select(Job).where(Job.tenant_id == tenant_id,
                                               Job.state == "running")
                             .order_by(Job.started_at).limit(50)))
    return FleetView(
        counts=counts, queue_depth=depth,
        oldest_queued_s=(now - oldest).total_seconds() if oldest else None,
        wait_p50=_quantile(waits, 0.5), wait_p90=_quantile(waits, 0.9),
        wait_max=max(waits) if waits else None, waits_counted=len(waits), workers=workers,
        failures=sorted(groups.values(), key=lambda g: (-g.count, g.code)), running=running)


# -- the submit form ---------------------------------------------------------------------------
#: Request fields that have their own input on the submit form (dotted paths).
FORM_FIELDS = ("model_id", "revision", "target_ratio", "schedule", "export.profile",
               "calibration.source", "calibration.num_samples", "calibration.seq_len",
               "calibration.seed", "pruning.preset", "pruning.gqa_policy", "pruning.percdamp",
               "pruning.min_group",
               "destination.hub_repo_id", "destination.private", "destination.create_pr",
               "evaluate.perplexity")


def _get(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def form_values(defaults: dict[str, Any], base: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Initial form values (a previous job's request over the API defaults), and the rest of
    that request, which the form keeps as editable JSON under "advanced"."""
    values = {}
    for path in FORM_FIELDS:
        v = _get(base, path)
        if path == "schedule" and isinstance(v, list):
            v = None  # an explicit per-layer list lives in the advanced JSON
        values[path] = v if v is not None else _get(defaults, path)
    rest: dict[str, Any] = {}
    for key, value in base.items():
        if isinstance(value, dict):
            extra = {k: v for k, v in value.items()
                     if f"{key}.{k}" not in FORM_FIELDS and v is not None}
            if extra:
                rest[key] = extra
        elif key not in FORM_FIELDS or (key == "schedule" and isinstance(value, list)):
            rest[key] = value
    import json

    return values, json.dumps(rest, indent=2) if rest else ""
