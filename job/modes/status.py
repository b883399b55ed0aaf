"""``python -m job status RUN_URI [--json] [--watch SECONDS]`` (docs/run-folder.md): where a run stands,
read from its run folder alone.

Meant for a laptop with only requirements-status.txt installed: nothing this module imports,
directly or not, may import torch or numpy (tests/unit/test_layers.py walks the imports). A
checkpoint is judged by the sizes its manifest promises, from one listing; checking its hashes
would mean downloading it, which is ``verify``'s job.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import webbrowser
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

from tenacity import Retrying, stop_after_attempt, stop_after_delay, wait_exponential_jitter

from job.monitoring.page.write import page_html
from job.monitoring.progress import format_duration, render_progress
from job.storage import Layout, RemoteFolder, StoreRefused, open_folder
from job.monitoring.run_facts import (
    DEFAULT_HEARTBEAT_SECONDS,
    LIVE_STATUSES,
    STALE_AFTER_BEATS,
    FolderReader,
    age_seconds,
    epoch_records,
    heartbeat_interval,
    is_number,
    newest_committed_checkpoint,
    parse_progress,
)
from job.storage.folders import retry_transient

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_NO_RUN = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT

TREND_EPOCHS = 5
# progress.json's times and the store's Date header are whole seconds, and two machines' clocks
# differ by a second or two even under NTP: a heartbeat ahead of the store's clock by less than
# this is simply fresh, and this machine's clock off by less is not worth a note.
CLOCK_TOLERANCE_SECONDS = 5.0
FINAL_STATUSES = ("completed", "failed", "stalled")  # --watch stops on these: nothing more will happen

EXIT_CODES = {
    "healthy": EXIT_HEALTHY,
    "completed": EXIT_HEALTHY,
    "stale": EXIT_UNHEALTHY,
    "failed": EXIT_UNHEALTHY,
    "stalled": EXIT_UNHEALTHY,
    "preempted": EXIT_UNHEALTHY,
    "unknown": EXIT_UNHEALTHY,  # progress.json missing, unreadable or with a status we do not know
    "no such run": EXIT_NO_RUN,
    "unreachable": EXIT_NO_RUN,
    "refused": EXIT_NO_RUN,  # wrong credentials, access denied, no such bucket
}
# A store that does not answer (a 503, a reset) is asked again briefly, as the job does, before
# status says "unreachable"; a person waits for the answer, so only this long.
RETRY_ATTEMPTS = 3
RETRY_SECONDS = 2.0

T = TypeVar("T")


# --- reading the run folder --------------------------------------------------------------


class Unreachable(Exception):
    """The run folder did not answer; the message is the store's own words."""


class Refused(Unreachable):
    """The store answered that it will never let us read this run folder (and what to fix)."""


class RunFolder(FolderReader):
    """Read-only access to a run folder in which any failure of the store (a refused connection,
    missing credentials, a denied request, an unreadable disk) becomes ``Unreachable``, so that
    status answers "unreachable: <reason>" and never a traceback."""

    def __init__(self, uri: str):
        super().__init__(_asking_store(open_folder, uri))

    def read_bytes(self, rel: str) -> bytes | None:
        return _asking_store(self.folder.read_bytes, rel)

    def list_dir(self, rel: str) -> list[str]:
        return _asking_store(self.folder.list_dir, rel)

    def file_sizes(self, rel: str) -> dict[str, int]:
        """Name -> size of the files directly in folder ``rel``, from one listing."""
        return _asking_store(self.folder.file_sizes, rel)

    def now(self, here: datetime) -> datetime:
        """The store's clock now (the Date of its answer); a local run folder's store is this
        machine, whose clock says ``here``."""
        return _asking_store(self.folder.now) if isinstance(self.folder, RemoteFolder) else here


def _asking_store(call: Callable[..., T], *args: Any) -> T:
    retrying = Retrying(
        retry=retry_transient,
        stop=stop_after_attempt(RETRY_ATTEMPTS) | stop_after_delay(RETRY_SECONDS),
        wait=wait_exponential_jitter(multiplier=0.2, max=1.0),
        reraise=True,
    )
    try:
        return retrying(call, *args)
    except StoreRefused as exc:
        raise Refused(str(exc)) from exc
    except Exception as exc:  # whatever else the store's client raises, the answer is the same
        raise Unreachable(f"{type(exc).__name__}: {exc}") from exc


# --- judging what was read ---------------------------------------------------------------


@dataclass
class RunReport:
    uri: str
    checked_at: datetime
    health: str
    problem: str | None = None  # why the run could not be read or judged
    progress: dict[str, Any] | None = None
    heartbeat_age: float | None = None
    stale_after: float = STALE_AFTER_BEATS * DEFAULT_HEARTBEAT_SECONDS
    newest_checkpoint: dict[str, Any] | None = None
    latest: Any = None
    loss_trend: dict[str, Any] | None = None
    writer: dict[str, Any] | None = None  # who holds the run's lease (lease.json), if anyone did
    notes: list[str] = field(default_factory=list)
    clock_skew: float | None = None  # seconds this machine's clock is ahead of the store's

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.health]

    @property
    def status(self) -> str | None:
        return self.progress.get("status") if self.progress else None

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


def utc_clock() -> datetime:
    return datetime.now(timezone.utc)


def read_run(uri: str, clock: Callable[[], datetime] = utc_clock) -> RunReport:
    """Where the run at ``uri`` stands. Heartbeat age and lease expiry are measured by the store's
    clock, never by this machine's (``clock``), which may be minutes off on a laptop: the verdict
    is the same, and a note says by how much the two disagree."""
    try:
        run = RunFolder(uri)
        now = run.now(clock())
        skew = (clock() - now).total_seconds()
        report = assess_run(run, uri, now)
    except Refused as exc:
        return RunReport(uri, clock(), "refused", problem=f"refused: {exc}")
    except Unreachable as exc:
        return RunReport(uri, clock(), "unreachable", problem=f"unreachable: {exc}")
    report.clock_skew = skew
    if abs(skew) > CLOCK_TOLERANCE_SECONDS:
        report.notes.append(
            f"this machine's clock is {format_duration(round(abs(skew)))} {'ahead of' if skew > 0 else 'behind'} the store's; "
            "heartbeat age and lease expiry are measured by the store's clock"
        )
    return report


def assess_run(run: RunFolder, uri: str, now: datetime) -> RunReport:
    progress_bytes = run.read_bytes(Layout.progress)
    checkpoint_names = run.list_dir(Layout.checkpoints)
    if progress_bytes is None and not checkpoint_names:
        problem = f"no such run: neither {Layout.progress} nor {Layout.checkpoints}/ at {uri}"
        return RunReport(uri, now, "no such run", problem=problem)

    notes: list[str] = []
    progress, problem = parse_progress(progress_bytes)
    # The stage the run is in has the checkpoints and losses worth showing.
    stage = Layout.stage_numbered((progress or {}).get("stage"))
    if stage is not Layout.stages[0]:
        checkpoint_names = run.list_dir(stage.checkpoints)
    report = RunReport(
        uri, now, "unknown",
        stale_after=STALE_AFTER_BEATS * heartbeat_interval(run.read_json(Layout.config, notes)),
        newest_checkpoint=newest_committed_checkpoint(run, stage, checkpoint_names, notes),
        latest=run.read_json(stage.latest, notes),
        loss_trend=loss_trend(run.read_bytes(stage.metrics), notes),
        writer=writer_summary(run.read_json(Layout.lease, notes), now),
        notes=notes,
    )
    report.progress, report.problem = progress, problem
    if report.progress is not None:
        report.heartbeat_age = age_seconds(report.progress.get("heartbeat_at"), now)
        report.health = judge_health(report.status, report.heartbeat_age, report.stale_after)
    return report


def writer_summary(lease: Any, now: datetime) -> dict[str, Any] | None:
    """The lease's holder and whether it still holds the run: ``holding`` until its expires_at
    (by the store's clock ``now``: as exact as the writer's clock agrees with it), else
    ``expired``, or ``released`` by a writer that ended."""
    if not isinstance(lease, dict):
        return None
    expires_in = age_seconds(lease.get("expires_at"), now)
    if lease.get("released_at"):
        state = "released"
    elif expires_in is not None and expires_in < 0:
        state = "holding"
    else:
        state = "expired"
    keys = ("attempt", "host", "pid", "acquired_at", "renewed_at", "expires_at", "released_at")
    return {**{k: lease.get(k) for k in keys}, "state": state}


def judge_health(status: Any, heartbeat_age: float | None, stale_after: float) -> str:
    if status in LIVE_STATUSES:
        # No readable heartbeat proves nothing is alive.
        fresh = heartbeat_age is not None and heartbeat_age <= stale_after
        return "healthy" if fresh else "stale"
    if status in ("completed", "failed", "stalled", "preempted"):
        return status
    return "unknown"


def loss_trend(metrics: bytes | None, notes: list[str]) -> dict[str, Any] | None:
    """The last few epochs' losses, and whether val_loss went down across them."""
    by_epoch = epoch_records(metrics or b"", notes)
    if not by_epoch:
        return None
    recent = [
        {"epoch": e, "train_loss": by_epoch[e].get("train_loss"), "val_loss": by_epoch[e].get("val_loss")}
        for e in sorted(by_epoch)[-TREND_EPOCHS:]
    ]
    val = [r["val_loss"] for r in recent if is_number(r["val_loss"])]
    all_val = [(r.get("val_loss"), e) for e, r in by_epoch.items() if is_number(r.get("val_loss"))]
    best_val, best_epoch = min(all_val) if all_val else (None, None)
    return {
        "recent": recent,
        # Ends of the window rather than the last two epochs: one noisy epoch should not flip it.
        "val_improving": val[-1] < val[0] if len(val) >= 2 else None,
        "best_val_loss": best_val,
        "best_epoch": best_epoch,
    }


# --- showing it --------------------------------------------------------------------------


def report_json(report: RunReport) -> dict[str, Any]:
    """The raw progress fields plus what status derived from the whole run folder."""
    return {
        **(report.progress or {}),
        "uri": report.uri,
        "checked_at": report.checked_at.isoformat(timespec="seconds"),
        "health": report.health,
        "exit_code": report.exit_code,
        "problem": report.problem,
        "stale": report.health == "stale",
        "heartbeat_age_seconds": None if report.heartbeat_age is None else round(report.heartbeat_age, 1),
        "stale_after_seconds": report.stale_after,
        "newest_checkpoint": report.newest_checkpoint,
        "latest": report.latest,
        "loss_trend": report.loss_trend,
        "writer": report.writer,
        "notes": report.notes,
        "clock_skew_seconds": None if report.clock_skew is None else round(report.clock_skew, 1),
    }


def report_text(report: RunReport) -> str:
    if report.health in ("no such run", "unreachable", "refused"):
        return f"{report.uri}: {report.problem}\n"
    lines = [_row("run:", report.uri)]
    headline = health_headline(report)
    if headline:
        lines += ["", f"!!! {headline}", ""]
    if report.progress is not None:
        lines += render_progress(report.progress).splitlines()
        lines.append(_row("heartbeat age:", heartbeat_text(report)))
    lines += checkpoint_lines(report.newest_checkpoint)
    if isinstance(report.latest, dict):
        lines.append(_row("latest.json:", str(report.latest.get("checkpoint"))))
    lines += loss_trend_lines(report.loss_trend)
    if report.writer:
        w = report.writer
        lines.append(_row("writer:", f"attempt {w['attempt']} on {w['host']} (pid {w['pid']}), {w['state']} "
                                     f"(renewed {w['renewed_at']})"))
    lines += [_row("note:", note) for note in report.notes]
    shown = report.health.upper() if report.exit_code else report.health
    lines.append(_row("health:", f"{shown} (exit {report.exit_code})"))
    return "\n".join(lines) + "\n"


def health_headline(report: RunReport) -> str | None:
    """One line a person cannot miss, for a run that is not fine."""
    progress = report.progress or {}
    error = progress.get("error") or "no error recorded"
    if report.health == "stale":
        silence = "has no readable heartbeat" if report.heartbeat_age is None else (
            f"has not beaten for {format_duration(report.heartbeat_age)}"
        )
        return (
            f"STALE: the run says {report.status} but {silence} (limit {STALE_AFTER_BEATS} heartbeat intervals, "
            f"{format_duration(report.stale_after)}); the job is probably dead or hung"
        )
    if report.health == "preempted":
        return "PREEMPTED: stopped by SIGTERM after saving; not healthy until a restart resumes it"
    if report.health in ("failed", "stalled"):
        return f"{report.health.upper()}: {error}"
    if report.health == "unknown":
        return f"UNKNOWN: {report.problem or f'status {report.status!r} is not one the job writes'}"
    return None


def heartbeat_text(report: RunReport) -> str:
    limit = f"stale after {format_duration(report.stale_after)} while running"
    if report.heartbeat_age is None:
        return f"unknown (no readable heartbeat_at; {limit})"
    if report.heartbeat_age < -CLOCK_TOLERANCE_SECONDS:
        return f"in the future by {format_duration(-report.heartbeat_age)} (clock skew?; {limit})"
    return f"{format_duration(report.heartbeat_age)} old ({limit})"


def checkpoint_lines(checkpoint: dict[str, Any] | None) -> list[str]:
    if checkpoint is None:
        return [_row("checkpoint:", "no committed checkpoint yet")]
    return [
        _row("checkpoint:", f"{checkpoint['name']}, the newest committed one (step {checkpoint['step']}, "
                            f"epoch {checkpoint['epoch']}, {checkpoint['created_at']})"),
        _row("", f"committed, sizes match; {verify_text(checkpoint['verify'])}"),
    ]


def verify_text(verify: dict[str, Any] | None) -> str:
    if verify is None:
        return "not verified"
    if not verify["passed"]:
        return f"verify FAILED ({', '.join(verify['failed_checks']) or f'see {Layout.verify_report}'})"
    return "verify passed" if verify["covers_checkpoint"] else "verify passed, but for older checkpoints only"


def loss_trend_lines(trend: dict[str, Any] | None) -> list[str]:
    if trend is None:
        return [_row("loss trend:", "no epoch finished yet")]
    lines = [_row("loss trend:", f"{'epoch':>5}  {'train_loss':>10}  {'val_loss':>10}")]
    for r in trend["recent"]:
        lines.append(_row("", f"{r['epoch']:>5}  {_loss(r['train_loss']):>10}  {_loss(r['val_loss']):>10}"))
    improving = {True: "improving", False: "NOT improving", None: "too few epochs to tell"}[trend["val_improving"]]
    summary = f"val_loss {improving} over the last {len(trend['recent'])} epoch(s)"
    if trend["best_epoch"] is not None:
        summary += f"; best {_loss(trend['best_val_loss'])} at epoch {trend['best_epoch']}"
    lines.append(_row("", summary))
    return lines


def _loss(value: Any) -> str:
    return f"{value:.5f}" if is_number(value) else "-"


def _row(label: str, value: str) -> str:
    # The same column as render_progress, so that the lines read as one table.
    return f"{label:<17}{value}"


def show(report: RunReport, json_output: bool, clear_screen: bool = False) -> None:
    if clear_screen:
        sys.stdout.write("\033[H\033[2J")
    # One line per report, so that --watch --json is a JSON-lines stream.
    sys.stdout.write(json.dumps(report_json(report)) + "\n" if json_output else report_text(report))
    sys.stdout.flush()


# --- the mode ----------------------------------------------------------------------------


def main(uri: str, as_json: bool, watch: float | None, html: str | None = None, open_page: bool = False) -> int:
    """Print where the run at ``uri`` stands; with ``watch``, again every ``watch`` seconds until
    the run ends or Ctrl-C; with ``html``, also write the run page there (and open it). Returns
    the exit code (0 healthy or completed, 1 not healthy, 2 no such run or unreachable)."""
    try:
        if watch is None:
            report = read_run(uri)
            show(report, as_json)
            if html and report.exit_code != EXIT_NO_RUN:
                write_page(uri, html, open_page)
            return report.exit_code
        # Ctrl-C ends a watch even where SIGINT came ignored (a shell starts its background
        # commands so, and Python then installs no handler of its own).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return watch_run(uri, as_json, watch, html, open_page)
    except KeyboardInterrupt:
        # Ctrl-C is how a person ends --watch: that is success, not an error.
        return EXIT_HEALTHY if watch is not None else EXIT_INTERRUPTED


def write_page(uri: str, path: str, open_page: bool) -> None:
    """The run page of ``uri`` into the file ``path`` (the same page the job keeps in the run
    folder, from the run folder alone); a store that stops answering meanwhile is said on stderr."""
    try:
        html = page_html(RunFolder(uri), uri)
    except Unreachable as exc:
        print(f"no page written: {exc}", file=sys.stderr)
        return
    target = Path(path).resolve()
    target.write_text(html, encoding="utf-8")
    print(f"page: {target}", file=sys.stderr)
    if open_page:
        webbrowser.open(target.as_uri())


def watch_run(uri: str, as_json: bool, every: float, html: str | None = None, open_page: bool = False) -> int:
    clear_screen = not as_json and sys.stdout.isatty()
    # A blank line between reports in a log or a pipe; a terminal is cleared instead.
    between_reports = "" if clear_screen or as_json else "\n"
    separator, opened = "", False
    while True:
        report = read_run(uri)
        sys.stdout.write(separator)
        show(report, as_json, clear_screen)
        if html and report.exit_code != EXIT_NO_RUN:
            write_page(uri, html, open_page and not opened)  # opened once, then refreshed in place
            opened = True
        if report.finished:
            return report.exit_code
        separator = between_reports
        time.sleep(every)
