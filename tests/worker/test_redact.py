from __future__ import annotations

import logging

import pytest

from worker.redact import REDACTED, RedactingFilter, install_redaction, redact, register_secret

TOKEN = "hf_" + "Zx9" * 12


def test_redact_hub_tokens_and_registered_secrets() -> None:
    register_secret("s3cr3t-password-value")
    text = f"token={TOKEN} pw=s3cr3t-password-value hf_short stays"
    out = redact(text)
    assert TOKEN not in out and "s3cr3t-password-value" not in out
    assert out.count(REDACTED) == 2 and "hf_short" in out


def test_filter_scrubs_args_and_exceptions() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "auth %s", (TOKEN,), None)
    assert RedactingFilter().filter(record)
    assert TOKEN not in record.getMessage()
    try:
        raise RuntimeError(f"bad token {TOKEN}")
    except RuntimeError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    RedactingFilter().filter(record)
    assert record.exc_text and TOKEN not in record.exc_text and REDACTED in record.exc_text


def test_installed_factory_scrubs_every_logger(caplog: pytest.LogCaptureFixture) -> None:
    install_redaction()
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("some.library").warning("sending Authorization: Bearer %s", TOKEN)
        try:
            raise ValueError(TOKEN)
        except ValueError:
            logging.getLogger("other").exception("oops")
    assert TOKEN not in caplog.text
    assert REDACTED in caplog.text
