"""Keep Hub tokens and other secrets out of logs.

Two layers, because a filter on a logger does not see records that propagate from child
loggers: a log-record factory scrubs every record at creation (any library, any handler), and
:class:`RedactingFilter` can be attached to handlers that are built before the factory exists.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from typing import Any

HUB_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{30,}")
REDACTED = "[REDACTED]"
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
    """``text`` with Hub tokens and registered secrets replaced by ``[REDACTED]``."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return HUB_TOKEN_RE.sub(REDACTED, text)


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
    """Rewrites records in place; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_record(record)
        return True


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Scrub all records of this process, and attach a filter to ``logger``'s handlers.

    Idempotent; call again after a framework (Celery) has rebuilt its handlers.
    """
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
