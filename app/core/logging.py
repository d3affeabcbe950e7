"""Logging: plain text or one JSON object per line (structlog's ProcessorFormatter over the
standard library's records), for every logger of the process (the service's, uvicorn's,
Celery's, libraries'); the job id and request id on the lines logged while they are current;
secrets scrubbed once, where records are made.

Redaction has one implementation, :func:`redact`: Hub tokens (``hf_...``), API keys
(``sgk_...``), ``Bearer`` credentials and registered secrets (a tenant's token while its job
runs) become ``[REDACTED]``. A log-record factory applies it to every record at creation, so no
handler, formatter or library can print the secret; :class:`RedactingFilter` does the same for
handlers some framework built before (Celery).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import structlog

REDACTED = "[REDACTED]"
_PATTERNS = [
    (re.compile(r"hf_[A-Za-z0-9]{8,}"), REDACTED),
    (re.compile(r"sgk_[A-Za-z0-9]+_[A-Za-z0-9_\-]+"), REDACTED),
    (re.compile(r"(?i)(bearer\s+)[^\s\"']+"), r"\1" + REDACTED),
]
# Short strings would blank out ordinary words in logs; real secrets are long.
_MIN_SECRET_LEN = 8
_secrets: set[str] = set()
_lock = threading.Lock()
_installed = False


def register_secret(secret: str | None) -> None:
    """Scrub ``secret`` from every log record from now on (e.g. a tenant's token)."""
    if secret and len(secret) >= _MIN_SECRET_LEN:
        with _lock:
            _secrets.add(secret)


def unregister_secret(secret: str | None) -> None:
    with _lock:
        _secrets.discard(secret or "")


def redact(text: str) -> str:
    """``text`` with registered secrets, Hub tokens, API keys and Bearer credentials replaced
    by ``[REDACTED]``."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


scrub = redact  # the name the API used


def _scrub_record(record: logging.LogRecord) -> None:
    if getattr(record, "_slimgpt_redacted", False):
        return
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken format string: leave it to the handler
        return
    record.msg = redact(message)
    record.args = ()
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._slimgpt_redacted = True


class RedactingFilter(logging.Filter):
    """Scrubs a record in place (see :func:`redact`); never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_record(record)
        return True


ScrubFilter = RedactingFilter  # the name the API used


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Scrub every record of this process at creation, and attach a filter to ``logger``'s
    (default: the root logger's) handlers. Idempotent; call again after a framework (Celery)
    has rebuilt its handlers."""
    global _installed
    with _lock:
        if not _installed:
            previous = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                _scrub_record(record)
                return record

            logging.setLogRecordFactory(factory)
            _installed = True
    target = logger if logger is not None else logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


# -- context: the job and the request a line belongs to ------------------------------------------
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


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Log lines emitted while this request is handled get ``request_id``."""
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        yield


class JobContextFilter(logging.Filter):
    """Adds the current job's id (see :func:`job_context`) to records that lack one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            job_id = _current_job_id.get()
            if job_id is not None:
                record.job_id = job_id
        return True


def job_logger(name: str, job_id: str) -> logging.LoggerAdapter:
    """A logger whose every line carries ``job_id``."""
    return logging.LoggerAdapter(logging.getLogger(name), {"job_id": job_id})


# -- formatting ---------------------------------------------------------------------------------
#: Record attributes (``extra=``) that become fields of a line.
CONTEXT_FIELDS = ("job_id", "tenant_id", "request_id", "phase", "layer", "method", "path",
                  "status", "duration_ms")


def _add_job_id(logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if event.get("job_id") is None:
        job_id = _current_job_id.get()
        if job_id is not None:
            event["job_id"] = job_id
    return event


def _upper_level(logger: Any, name: str, event: MutableMapping[str, Any]
                 ) -> MutableMapping[str, Any]:
    # "INFO", as the service always wrote it (log pipelines filter on it).
    if isinstance(event.get("level"), str):
        event["level"] = event["level"].upper()
    return event


def _drop_none(logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return {k: v for k, v in event.items() if v is not None}


def _text(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
    """``time LEVEL logger message key=value ...`` (and the traceback on its own lines)."""
    exc = event.pop("exception", None)
    head = (f"{event.pop('time', '')} {event.pop('level', '')} "
            f"{event.pop('logger', '')} {event.pop('message', '')}")
    tail = " ".join(f"{k}={v}" for k, v in event.items() if not k.startswith("_"))
    line = f"{head} {tail}" if tail else head
    return f"{line}\n{exc}" if exc else line


def formatter(json_lines: bool) -> logging.Formatter:
    """The one formatter of every handler this module installs."""
    pre_chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.ExtraAdder(allow=CONTEXT_FIELDS),
        _add_job_id,
        structlog.stdlib.add_log_level,
        _upper_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
    ]
    final: list[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,
        structlog.processors.EventRenamer("message"),
        _drop_none,
    ]
    if json_lines:
        final.append(structlog.processors.JSONRenderer(default=str))
    else:
        final.append(_text)
    return structlog.stdlib.ProcessorFormatter(processors=final, foreign_pre_chain=pre_chain)


# Kept for callers that format one record by hand (tests, tools).
class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._inner = formatter(True)

    def format(self, record: logging.LogRecord) -> str:
        return self._inner.format(record)


#: The logger trees the service writes to: the API/crud (``slimgpt.*``) and the job code of the
#: worker package (``worker.*``, which the embedded in-process worker runs too).
SERVICE_LOGGERS = ("slimgpt", "worker")


def configure_logging(json_lines: bool = False, level: str = "INFO",
                      names: Sequence[str] = SERVICE_LOGGERS) -> None:
    """One stderr handler on the root logger, so every logger's lines (uvicorn's and Celery's
    included, see :func:`uvicorn_log_config`) come out in one format; the service's loggers
    at ``level``. Secrets are scrubbed (:func:`install_redaction`)."""
    install_redaction()
    handler = logging.StreamHandler(sys.stderr)
    handler._slimgpt = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter(json_lines))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_slimgpt", False):
            root.removeHandler(old)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    for name in names:
        logging.getLogger(name).setLevel(level.upper())


def adopt_handlers(logger: logging.Logger, json_lines: bool) -> None:
    """Give handlers a framework built (Celery's) this module's format and redaction."""
    for handler in logger.handlers:
        handler.setFormatter(formatter(json_lines))
    install_redaction(logger)


def uvicorn_log_config(level: str = "INFO") -> dict[str, Any]:
    """uvicorn's ``log_config``: its loggers keep their levels but no handlers of their own, so
    their lines reach the root handler of :func:`configure_logging` (JSON under
    SLIMGPT_LOG_JSON=1). Access lines come from the API's request-id middleware instead, with
    the request id."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            "uvicorn": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": True},
        },
    }
