"""Logging setup: plain text or one JSON object per line, job id on job lines, secrets scrubbed."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone

_SECRET_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{6,}"),
    re.compile(r"sgk_[A-Za-z0-9]+_[A-Za-z0-9_\-]+"),
    re.compile(r"(?i)(bearer\s+)[^\s\"']+"),
]


def scrub(text: str) -> str:
    """Replace anything that looks like a Hub token or an API key."""
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + "***", text)
        else:
            text = pattern.sub("***", text)
    return text


class ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not kill logging
            return True
        clean = scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


#: The job the current thread/task is running; set by the workers around a job's execution so
#: that *every* log line of the job carries its id, including lines from code that knows nothing
#: of jobs. (A thread started inside a job does not inherit it: wrap its target in job_context.)
_current_job_id: ContextVar[str | None] = ContextVar("slimgpt_job_id", default=None)


def current_job_id() -> str | None:
    return _current_job_id.get()


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Log lines emitted inside this block get ``job_id`` (unless they set one themselves)."""
    token = _current_job_id.set(job_id)
    try:
        yield
    finally:
        _current_job_id.reset(token)


class JobContextFilter(logging.Filter):
    """Adds the current job's id (see :func:`job_context`) to records that lack one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            job_id = _current_job_id.get()
            if job_id is not None:
                record.job_id = job_id
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job_id", "tenant_id", "request_id", "phase", "layer"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job_id = getattr(record, "job_id", None)
        return f"{line} job_id={job_id}" if job_id else line


def job_logger(name: str, job_id: str) -> logging.LoggerAdapter:
    """A logger whose every line carries ``job_id``."""
    return logging.LoggerAdapter(logging.getLogger(name), {"job_id": job_id})


#: The logger trees the service writes to: the API/crud (``slimgpt.*``) and the job code of the
#: worker package (``worker.*``, which the embedded in-process worker runs too).
SERVICE_LOGGERS = ("slimgpt", "worker")


def configure_logging(json_lines: bool = False, level: str = "INFO",
                      names: Sequence[str] = SERVICE_LOGGERS) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler._slimgpt = True  # type: ignore[attr-defined]
    handler.setFormatter(
        JsonFormatter() if json_lines else TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    handler.addFilter(ScrubFilter())
    handler.addFilter(JobContextFilter())
    for name in names:
        root = logging.getLogger(name)
        root.setLevel(level.upper())
        for old in list(root.handlers):
            if getattr(old, "_slimgpt", False):
                root.removeHandler(old)
        root.addHandler(handler)
        if not any(isinstance(f, ScrubFilter) for f in root.filters):
            root.addFilter(ScrubFilter())
