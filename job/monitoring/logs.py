"""Structured logs (docs/run-folder.md): JSON lines on stdout (on a terminal, readable lines above a
progress bar), the same records in the run folder's ``logs/``, and secrets redacted before anything
is written."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import structlog

from job.monitoring.console import ConsoleProgress
from job.runtime.files import NO_SPACE, disk_full
from job.storage import Layout, RunStore

# Fields stamped on every record of this process (mode, attempt, rank). A plain dict rather
# than contextvars, because records also come from the heartbeat and other threads.
_RUN_CONTEXT: dict[str, Any] = {}


def bind_run_context(**fields: Any) -> None:
    _RUN_CONTEXT.update(fields)


def _add_run_context(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in _RUN_CONTEXT.items():
        event.setdefault(key, value)
    return event


# Environment variables whose values must never reach a log line or a file of the run.
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
# A field is a secret when one word of its name is one of these (aws_session_token, Authorization;
# not tokenizer or max_tokens).
SECRET_KEY_WORDS = frozenset({
    "secret", "secrets", "password", "passwd", "token", "credential", "credentials", "authorization",
})
REDACTED = "[REDACTED]"
# Clients that log request details (signed headers, credentials providers) at DEBUG.
NOISY_LOGGERS = ("botocore", "boto3", "aiobotocore", "s3fs", "fsspec", "urllib3", "aiohttp", "s3transfer")


def redact(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: REDACTED if _names_a_secret(str(k)) else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    return value


@functools.lru_cache(maxsize=4096)
def _names_a_secret(key: str) -> bool:
    """Cached: a run logs the same few dozen field names over and over, from the training thread."""
    return bool(SECRET_KEY_WORDS & set(re.split(r"[^a-z]+", key.lower())))


def _secrets() -> tuple[str, ...]:
    return tuple(v for k in SECRET_ENV_VARS if len(v := os.environ.get(k, "")) >= 4)


def redact_environment_secrets(value: Any) -> Any:
    return redact(value, _secrets())


def _redact_secrets(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return redact_environment_secrets(event)


_SHARED_PROCESSORS = [
    _add_run_context,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


class _JSONLines(structlog.stdlib.ProcessorFormatter):
    """Renders a record once for every handler that writes it as a JSON line (stdout and the run
    folder's log file): rendering and redacting twice cost the training thread ~60 us a record."""

    def format(self, record: logging.LogRecord) -> str:
        line = getattr(record, "_job_json_line", None)
        if line is None:
            line = super().format(record)
            record._job_json_line = line
        return line


def _formatter(console: bool = False) -> logging.Formatter:
    """JSON lines, or for a terminal a readable line (the progress bar is ConsoleProgress's).
    Secrets are redacted last, after exceptions have been rendered to text."""
    render = [structlog.processors.format_exc_info, _redact_secrets]
    if console:
        render += [structlog.dev.ConsoleRenderer(colors=False)]
    else:
        render += [structlog.processors.JSONRenderer(sort_keys=False)]
    return (structlog.stdlib.ProcessorFormatter if console else _JSONLines)(
        foreign_pre_chain=_SHARED_PROCESSORS,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )


def setup_logging(level: str = "INFO", **context: Any) -> None:
    """JSON lines on stdout, flushed per record. Goes through the standard library's logging so
    that third-party loggers land in the same pipeline; ``context`` (mode, rank, ...) is bound
    to every record."""
    structlog.configure(
        processors=[*_SHARED_PROCESSORS, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    terminal = sys.stdout.isatty()
    stdout = ConsoleProgress(sys.stdout) if terminal else logging.StreamHandler(sys.stdout)
    stdout.setFormatter(_formatter(console=terminal))
    root.addHandler(stdout)
    root.setLevel(level.upper())
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    _RUN_CONTEXT.clear()
    bind_run_context(**context)


class RunLogFile(logging.FileHandler):
    """The log file of an attempt. A write that fails (a full disk) is reported once, on the
    records that still flow (stdout), and the file is then left alone: without this, the logging
    module prints a traceback to stderr for every record that follows."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8")
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def flush(self) -> None:
        if not self.failed:
            super().flush()

    def handleError(self, record: logging.LogRecord | None) -> None:
        if self.failed:
            return
        self.failed = True  # first, so that the record below does not come back here
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            needed = len(self.format(record).encode()) if record is not None else None
            exc = disk_full(Path(self.baseFilename), needed)
        try:  # what is still buffered for the file cannot be written either
            self.stream.close()
        except (OSError, ValueError):
            pass
        self.stream = None  # so that close() at exit has nothing left to flush
        structlog.get_logger("job.logs").error(
            "log_file.failed", path=self.baseFilename, error=str(exc),
            consequence="the log goes on on stdout only",
        )


class RunLog:
    """This attempt's log file in the run folder (``logs/attempt-NNN.jsonl``): every record, as
    JSON lines, appended locally and mirrored to the run URI whenever ``publish`` is called."""

    def __init__(self, store: RunStore, attempt: int):
        self.store = store
        self.rel = Layout.log_file(attempt)
        self._handler = RunLogFile(store.local_path(self.rel))
        self._handler.setFormatter(_formatter())
        logging.getLogger().addHandler(self._handler)

    def publish(self) -> None:
        try:
            self._handler.flush()
        except OSError:
            self._handler.handleError(None)
        self.store.publish(self.rel)
