"""Log records (job.monitoring.logs): secrets redacted by value and by key, and every handler gets
a record in its own form."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from job.monitoring.logs import _SHARED_PROCESSORS, REDACTED, _formatter, redact

pytestmark = pytest.mark.timeout(30)


def test_secrets_are_redacted_by_value_and_by_key():
    record = {"error": "denied for key AKIASECRET123", "headers": {"Authorization": "AWS4 abc"}, "n": 3,
              "aws_session_token": "x", "tokenizer": {"checkpoint": "step-1"}}
    clean = redact(record, ("AKIASECRET123",))
    assert clean == {"error": f"denied for key {REDACTED}", "headers": {"Authorization": REDACTED}, "n": 3,
                     "aws_session_token": REDACTED, "tokenizer": {"checkpoint": "step-1"}}


def test_a_record_reaches_every_handler_in_its_handlers_form(monkeypatch):
    """Rendered once for the JSON handlers (stdout and the attempt's log file), never reused for
    a terminal's readable line; redacted in both."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    streams = {form: io.StringIO() for form in ("stdout", "file", "terminal")}
    logger = logging.getLogger("test.forms")
    handlers = []
    for form, stream in streams.items():
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_formatter(console=form == "terminal"))
        logger.addHandler(handler)
        handlers.append(handler)
    try:
        structlog.wrap_logger(  # as setup_logging configures structlog, without touching the global config
            logger, processors=[*_SHARED_PROCESSORS, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
            wrapper_class=structlog.stdlib.BoundLogger,
        ).warning(
            "storage.denied", error="key s3cr3t-value refused", step=7, token="abc",
        )
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
    lines = {form: stream.getvalue() for form, stream in streams.items()}
    assert lines["stdout"] == lines["file"]
    record = json.loads(lines["file"])
    assert record["event"] == "storage.denied" and record["step"] == 7
    assert record["error"] == f"key {REDACTED} refused" and record["token"] == REDACTED
    assert not lines["terminal"].startswith("{") and "storage.denied" in lines["terminal"]
    assert "s3cr3t-value" not in "".join(lines.values()) and "abc" not in "".join(lines.values())
