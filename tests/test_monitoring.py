"""Monitoring in process: the watchdog and the heartbeat driven by a fake clock, stop signals,
progress files, and redaction of secrets in log records."""

from __future__ import annotations

import io
import json
import logging
import os
import signal

import pytest
import structlog

from job.monitoring.logs import _SHARED_PROCESSORS, REDACTED, _formatter, redact
from job.monitoring.progress import Heartbeat, Progress, render_progress
from job.monitoring.watchdog import Watchdog
from job.runtime.signals import Stopped, StopRequest, stop_point
from job.storage import Layout, RunStore
from tests.helpers import FakeClock

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def progress(tmp_path) -> Progress:
    return Progress(RunStore(str(tmp_path)), attempt=2, epochs=4, total_steps=100)


def read_progress(progress: Progress) -> dict:
    return json.loads((progress.store.root / Layout.progress).read_text())


def test_the_watchdog_ends_a_run_with_no_step_for_its_limit(progress, caplog):
    clock, exits = FakeClock(), []
    watchdog = Watchdog(progress, limit=60, clock=clock, exit=exits.append)
    clock.now += 59
    watchdog.tick()
    assert exits == []
    watchdog.touch()  # a step completed
    clock.now += 59
    watchdog.tick()
    assert exits == []
    clock.now += 1
    with caplog.at_level(logging.ERROR):
        watchdog.tick()
    assert exits == [Watchdog.EXIT_STALLED] == [75]
    state = read_progress(progress)
    assert state["status"] == "stalled" and "60 s" in state["error"]


def test_the_watchdog_gives_on_stall_its_chance_even_when_it_fails(progress):
    clock, exits, called = FakeClock(), [], []

    def on_stall():
        called.append(True)
        raise OSError("the store is away")

    watchdog = Watchdog(progress, limit=1, clock=clock, exit=exits.append, on_stall=on_stall)
    clock.now += 5
    with pytest.raises(OSError):
        watchdog.tick()
    assert called and exits == [75]  # the exit comes whatever on_stall did


def test_a_heartbeat_refreshes_progress_and_survives_a_failing_upload(progress):
    beats = []

    def on_beat():
        beats.append(True)
        raise OSError("upload failed")

    before = read_progress(progress)["heartbeat_at"] if (progress.store.root / Layout.progress).exists() else None
    heartbeat = Heartbeat(progress, interval=30, on_beat=on_beat)
    heartbeat.tick()
    heartbeat.tick()  # the first failure did not end anything
    assert len(beats) == 2
    state = read_progress(progress)
    assert state["heartbeat_at"] and state["heartbeat_at"] != before
    assert "status:" in (progress.store.root / Layout.progress_text).read_text()


def test_a_committed_checkpoint_is_written_with_the_next_heartbeat_not_on_its_own(progress):
    progress.update(step=10)
    progress.remember(last_checkpoint="step-00000010")
    assert read_progress(progress)["last_checkpoint"] is None
    Heartbeat(progress, interval=30).tick()
    assert read_progress(progress)["last_checkpoint"] == "step-00000010"
    assert "last checkpoint: step-00000010" in (progress.store.root / Layout.progress_text).read_text()


def test_a_stop_signal_is_a_request_and_the_handler_is_put_back(progress):
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal changes nothing
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_long_phase_ends_at_its_next_stop_point_once_a_signal_arrived():
    stop_point("generating the dataset")  # no StopRequest installed: nothing to honour
    with StopRequest():
        stop_point("generating the dataset")
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(Stopped, match="stopped by SIGINT while generating the dataset"):
            stop_point("generating the dataset")
    stop_point("generating the dataset")  # the request ended with its block


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


def test_progress_renders_for_a_person():
    text = render_progress({"status": "running", "mode": "train", "attempt": 2, "epoch": 3, "epochs": 4,
                            "step": 50, "total_steps": 100, "loss": 0.5, "samples_per_second": 12.0,
                            "eta_seconds": 65, "error": "boom"})
    assert "50/100 (50.0%)" in text and "1m05s" in text and "error:           boom" in text
