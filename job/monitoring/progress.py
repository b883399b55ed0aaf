"""Where a run stands (docs/run-folder.md): ``progress.json`` for programs, ``PROGRESS.txt`` for
people, refreshed by the training loop and by a heartbeat thread that cannot silently stop.

Imports no torch, so that a laptop can use the same rendering as the job."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import structlog

from job.monitoring.logs import redact_environment_secrets
from job.runtime.files import DiskFull
from job.storage import Layout, RunStore

STATUSES = ("starting", "running", "completed", "failed", "preempted", "stalled")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Progress:
    """The live state of a run: ``progress.json`` for programs, ``PROGRESS.txt`` for people.

    Updated from the training thread and the heartbeat thread, hence the lock."""

    def __init__(self, store: RunStore, on_write: Callable[[], None] = lambda: None, **fields: Any):
        """``on_write``: told after each rewrite (cheaply: it runs on the writer's thread, the
        training thread included)."""
        self.store = store
        self.on_write = on_write
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

    def remember(self, **fields: Any) -> None:
        """Merge ``fields`` without rewriting the files: the next update or heartbeat writes them.
        For news that may wait a progress interval (a checkpoint committed every few steps would
        otherwise add two file writes and uploads to each commit)."""
        with self._lock:
            self.fields.update(fields)

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
        self.on_write()


def render_progress(p: dict[str, Any]) -> str:
    """A few lines a person can read at a glance."""
    loss = _shown(p.get("loss"), lambda v: f"{v:.5f}")
    rate = _shown(p.get("samples_per_second"), lambda v: f"{v:.1f} samples/s")
    eta = _shown(p.get("eta_seconds"), format_duration)
    step, total = p.get("step", 0), p.get("total_steps")
    pct = 100.0 * step / total if _is_number(step) and _is_number(total) and total else 0.0
    lines = [
        f"status:          {p.get('status')} ({p.get('mode')}, attempt {p.get('attempt')})",
        *([f"stage:           {p['stage']}/{p.get('stages', '?')} ({p.get('stage_name', '-')})"] if p.get("stage") else []),
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any, number: Callable[[float], str]) -> str:
    """A number formatted, nothing as "-", and anything else (a progress.json written by hand or
    by another version) as it is, so that a person still sees it."""
    if value is None:
        return "-"
    return number(value) if _is_number(value) else repr(value)


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
        except DiskFull as exc:  # the message says it all; the run ends at its next write anyway
            self._log.error("heartbeat.failed", error=str(exc))
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
