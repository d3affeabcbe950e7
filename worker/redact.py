"""Keep Hub tokens and other secrets out of logs: the worker's names for the one redaction of
the process (:mod:`app.core.logging`)."""

from __future__ import annotations

from app.core.logging import (
    REDACTED,
    RedactingFilter,
    install_redaction,
    redact,
    register_secret,
    unregister_secret,
)

__all__ = ["REDACTED", "RedactingFilter", "install_redaction", "redact", "register_secret",
           "unregister_secret"]
