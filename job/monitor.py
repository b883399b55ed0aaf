"""Monitoring (SPEC §8, §9): structured logs, progress.json / PROGRESS.txt and the heartbeat.

Imports no torch, so that a laptop can use the same progress rendering as the job.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import Any

import structlog

from job.storage import Layout, RunStore

STATUSES = ("starting", "running", "completed", "failed", "preempted", "stalled")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
SECRET_KEY_WORDS = ("secret", "password", "token", "credential", "authorization")
REDACTED = "[REDACTED]"
# Clients that log request details (signed headers, credentials providers) at DEBUG.
NOISY_LOGGERS = ("botocore", "boto3", "aiobotocore", "s3fs", "fsspec", "urllib3", "aiohttp", "s3transfer")


def redact(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if any(w in str(k).lower() for w in SECRET_KEY_WORDS) else redact(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    return value


def _secrets() -> tuple[str, ...]:
    return tuple(v for k in SECRET_ENV_VARS if len(v := os.environ.get(k, "")) >= 4)


def redact_environment_secrets(value: Any) -> Any:
    return redact(value, _secrets())


def _redact_secrets(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return redact_environment_secrets(event)


def _progress_bar(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """For a person at a terminal: a bar on batch-progress lines."""
    step, total = event.get("step"), event.get("total_steps")
    if event.get("event") == "train.progress" and isinstance(step, int) and total:
        filled = int(30 * step / total)
        event["bar"] = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * step / total:5.1f}%"
    return event


_SHARED_PROCESSORS = [
    _add_run_context,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def _formatter(console: bool = False) -> logging.Formatter:
    """JSON lines, or for a terminal a readable line with a progress bar. Secrets are redacted
    last, after exceptions have been rendered to text."""
    render = [structlog.processors.format_exc_info, _redact_secrets]
    if console:
        render += [_progress_bar, structlog.dev.ConsoleRenderer(colors=False)]
    else:
        render += [structlog.processors.JSONRenderer(sort_keys=False)]
    return structlog.stdlib.ProcessorFormatter(
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
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(_formatter(console=sys.stdout.isatty()))
    root.addHandler(stdout)
    root.setLevel(level.upper())
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    _RUN_CONTEXT.clear()
    bind_run_context(**context)


def add_log_file(path: Path) -> None:
    """Also write every record, as JSON lines, to ``path`` (one file per attempt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_formatter())
    logging.getLogger().addHandler(handler)


class Progress:
    """The live state of a run: ``progress.json`` for programs, ``PROGRESS.txt`` for people.

    Updated from the training thread and the heartbeat thread, hence the lock."""

    def __init__(self, store: RunStore, **fields: Any):
        self.store = store
        self._lock = threading.Lock()
        now = utc_now()
        self.fields: dict[str, Any] = {
            "status": "starting",
            "mode": "train",
            "epoch": 0,
            "epochs": 0,
            "step": 0,
            "total_steps": 0,
            "loss": None,
            "samples_per_second": None,
            "eta_seconds": None,
            "started_at": now,
            "updated_at": now,
            "heartbeat_at": now,
            "attempt": 0,
            "last_checkpoint": None,
            **fields,
        }

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` and rewrite both files."""
        with self._lock:
            self.fields.update(fields)
            self.fields["updated_at"] = utc_now()
            self._write()

    def beat(self) -> None:
        with self._lock:
            self.fields["heartbeat_at"] = utc_now()
            self._write()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.fields)

    def _write(self) -> None:
        fields = redact_environment_secrets(self.fields)  # an error message may quote anything
        self.store.write_json(Layout.progress, fields)
        self.store.write_text(Layout.progress_text, render_progress(fields))


def render_progress(p: dict[str, Any]) -> str:
    """A few lines a person can read at a glance."""
    loss = "-" if p.get("loss") is None else f"{p['loss']:.5f}"
    rate = "-" if p.get("samples_per_second") is None else f"{p['samples_per_second']:.1f} samples/s"
    eta = "-" if p.get("eta_seconds") is None else format_duration(p["eta_seconds"])
    pct = 100.0 * p.get("step", 0) / p["total_steps"] if p.get("total_steps") else 0.0
    lines = [
        f"status:          {p.get('status')} ({p.get('mode')}, attempt {p.get('attempt')})",
        f"epoch:           {p.get('epoch')}/{p.get('epochs')}",
        f"step:            {p.get('step')}/{p.get('total_steps')} ({pct:.1f}%)",
        f"loss:            {loss}",
        f"speed:           {rate}",
        f"eta:             {eta}",
        f"last checkpoint: {p.get('last_checkpoint') or '-'}",
        f"started:         {p.get('started_at')}",
        f"updated:         {p.get('updated_at')}",
        f"heartbeat:       {p.get('heartbeat_at')}",
    ]
    if p.get("error"):
        lines.append(f"error:           {p['error']}")
    return "\n".join(lines) + "\n"


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class PeriodicThread:
    """A daemon thread that calls ``tick()`` every ``interval`` seconds inside its ``with`` block."""

    name = "periodic"

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self) -> None:
        raise NotImplementedError


class Heartbeat(PeriodicThread):
    """Every ``interval`` seconds, logs and refreshes progress.json, so that a reader can tell a
    slow run from a dead one."""

    name = "heartbeat"

    def __init__(self, progress: Progress, interval: float, on_beat: Callable[[], None] = lambda: None):
        super().__init__(interval)
        self.progress = progress
        self.on_beat = on_beat
        self._log = structlog.get_logger("job.heartbeat")

    def tick(self) -> None:
        try:
            self.progress.beat()
            state = self.progress.snapshot()
            self._log.info("heartbeat", step=state["step"], status=state["status"])
            self.on_beat()
        except Exception:  # a failed beat must not kill the thread: the next one may succeed
            self._log.exception("heartbeat.failed")


class RateMeter:
    """Samples per second over the recent past, and the ETA it implies."""

    def __init__(self, window_seconds: float = 30.0):
        self.window = window_seconds
        self._points: list[tuple[float, int]] = []

    def add(self, samples_done: int) -> None:
        now = time.monotonic()
        self._points.append((now, samples_done))
        while len(self._points) > 2 and now - self._points[0][0] > self.window:
            self._points.pop(0)

    def rate(self) -> float | None:
        if len(self._points) < 2:
            return None
        (t0, n0), (t1, n1) = self._points[0], self._points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def eta(self, samples_left: int) -> float | None:
        rate = self.rate()
        return samples_left / rate if rate else None


class Watchdog(PeriodicThread):
    """Ends a run that has stopped making progress (SPEC §8).

    When no ``touch()`` arrives for ``limit`` seconds it logs every thread's stack, marks the
    run ``stalled``, gives ``on_stall`` (e.g. a bounded upload flush) its chance, and ends the
    process with exit 75 so that the restart policy starts it again. A hung main thread cannot
    raise, so the exit is ``os._exit`` from this thread."""

    name = "watchdog"
    EXIT_STALLED = 75

    def __init__(self, progress: Progress, limit: float, on_stall: Callable[[], None] = lambda: None):
        super().__init__(interval=min(1.0, limit / 4))
        self.progress = progress
        self.limit = limit
        self.on_stall = on_stall
        self._last = time.monotonic()
        self._log = structlog.get_logger("job.watchdog")

    def touch(self) -> None:
        self._last = time.monotonic()

    def __enter__(self):
        self.touch()
        return super().__enter__()

    def tick(self) -> None:
        idle = time.monotonic() - self._last
        if idle >= self.limit:
            self._stall(idle)

    def _stall(self, idle: float) -> None:
        try:
            self._log.error("watchdog.stalled", idle_seconds=round(idle, 1), limit_seconds=self.limit, stacks=thread_stacks())
            self.progress.update(status="stalled", error=f"no training step for {idle:.0f} s")
            self.on_stall()
        finally:
            logging.shutdown()
            os._exit(self.EXIT_STALLED)


def thread_stacks() -> dict[str, str]:
    """Every thread's current stack, by thread name."""
    frames = sys._current_frames()
    return {
        f"{thread.name} ({thread.ident})": "".join(traceback.format_stack(frames[thread.ident]))
        for thread in threading.enumerate()
        if thread.ident in frames
    }


class StopRequest:
    """SIGTERM / SIGINT as a request: the training loop finishes its step, saves and exits 143.

    A second signal while the first is being honoured changes nothing; `docker stop` sends
    SIGKILL after its grace period anyway."""

    EXIT_CODE = 143

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            structlog.get_logger("job.signals").warning("signal.received", signal=self.signal_name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
