"""Writing the run page: once (``status --html``, the end of a mode), or again and again from a
thread of its own while the job trains (``PageWriter``), never from the training thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timezone

import structlog

from job.monitoring.page.facts import gather
from job.monitoring.page.html import render
from job.monitoring.run_facts import FolderReader, Readable
from job.storage import Layout, RunStore

log = structlog.get_logger("job.page")


def page_html(folder: Readable, uri: str, now: datetime | None = None) -> str:
    """The run page of the run folder ``folder`` (at ``uri``, as the page names it)."""
    return render(gather(FolderReader(folder), uri, now or datetime.now(timezone.utc)))


class PageWriter:
    """Rewrites the page with ``write(html)`` on its own thread (inside its ``with`` block) whenever
    ``request()`` was called (progress.json rewritten), at most every ``min_seconds``;
    ``write_now()`` writes it at once (the end of a run). A page that fails is logged and never
    ends a run."""

    def __init__(
        self, folder: Readable, uri: str, write: Callable[[str], None], min_seconds: float, enabled: bool = True,
    ):
        """``enabled``: False for a process whose writes are dropped (a DDP rank other than 0):
        it then draws no page at all."""
        self.folder, self.uri, self._write, self.min_seconds, self.enabled = folder, uri, write, min_seconds, enabled
        self._wanted = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # one page at a time: the thread's and write_now()'s callers'
        self._thread = threading.Thread(target=self._run, name="page", daemon=True)

    @classmethod
    def for_store(cls, store: RunStore, min_seconds: float = 1.0) -> PageWriter:
        """A writer of ``store``'s page that watches its local working copy (what this process
        writes: cheap to read again and again) and writes through the store (mirrored)."""
        return cls(store.local, store.uri, lambda html: store.write_text(Layout.page, html), min_seconds,
                   enabled=not store.read_only)

    def __enter__(self) -> PageWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._wanted.set()
        self._thread.join(timeout=10)

    def request(self) -> None:
        if self.enabled:
            self._wanted.set()

    def write_now(self, folder: Readable | None = None) -> None:
        """Write the page at once from ``folder`` (default: the one it watches)."""
        if not self.enabled:
            return
        with self._lock:
            try:
                self._write(page_html(folder or self.folder, self.uri))
            except Exception as exc:  # the page is never worth a run
                log.warning("page.failed", error=f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._closed.is_set():
                return
            self._wanted.clear()
            self.write_now()
            self._closed.wait(self.min_seconds)  # at most this often; close() cuts it short
