"""Structured logs: JSON lines carry the job id; secrets are scrubbed."""

from __future__ import annotations

import json
import logging

from app.core.logging import JsonFormatter, ScrubFilter, job_logger


def test_json_log_line_carries_the_job_id():
    record = logging.LogRecord("slimgpt.worker", logging.INFO, __file__, 1, "layer %d done",
                               (3,), None)
    record.job_id = "abc"
    line = json.loads(JsonFormatter().format(record))
    assert line["job_id"] == "abc" and line["message"] == "layer 3 done"
    assert line["level"] == "INFO"


def test_job_logger_adds_the_job_id(caplog):
    with caplog.at_level(logging.INFO, logger="slimgpt"):
        job_logger("slimgpt.test", "job-42").info("hello")
    assert caplog.records[-1].job_id == "job-42"


def test_scrub_filter_hides_tokens_in_arguments():
    record = logging.LogRecord("slimgpt", logging.INFO, __file__, 1, "using %s",
                               ("hf_abcdefghijklmnop",), None)
    ScrubFilter().filter(record)
    assert "hf_abcdefghijklmnop" not in record.getMessage()
