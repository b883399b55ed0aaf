"""A run that cannot hang silently (docs/run-folder.md): the watchdog ends a run whose steps stopped (exit 75),
and the lease keeper ends one that lost its lease to another writer (exit 75)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import structlog

from job.exits import EXIT_TRY_LATER
from job.monitoring.progress import PeriodicThread, Progress
from job.storage.lease import RENEW_SHARE, Lease, LeaseLost


def end_process(code: int) -> None:
    """Flush the logs and end the process at once, from any thread (a hung main thread cannot
    be asked to raise)."""
    logging.shutdown()
    os._exit(code)


class Watchdog(PeriodicThread):
    """Ends a run that has stopped making progress (docs/run-folder.md).

    When no ``touch()`` arrives for ``limit`` seconds it logs every thread's stack, marks the
    run ``stalled``, gives ``on_stall`` (e.g. a bounded upload flush) its chance, and ends the
    process with exit 75 so that the restart policy starts it again. A hung main thread cannot
    raise, so the exit comes from this thread."""

    name = "watchdog"
    EXIT_STALLED = EXIT_TRY_LATER

    def __init__(
        self, progress: Progress, limit: float, on_stall: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic, exit: Callable[[int], None] = end_process,
    ):
        """``clock`` and ``exit`` are the real ones in a run; tests pass a fake clock and an exit
        that records instead of ending the test process."""
        super().__init__(interval=min(1.0, limit / 4))
        self.progress = progress
        self.limit = limit
        self.on_stall = on_stall
        self.clock, self.exit = clock, exit
        self._last = clock()
        self._log = structlog.get_logger("job.watchdog")

    def touch(self) -> None:
        self._last = self.clock()

    def __enter__(self):
        self.touch()
        return super().__enter__()

    def tick(self) -> None:
        idle = self.clock() - self._last
        if idle >= self.limit:
            self._stall(idle)

    def _stall(self, idle: float) -> None:
        try:
            self._log.error("watchdog.stalled", idle_seconds=round(idle, 1), limit_seconds=self.limit, stacks=thread_stacks())
            self.progress.update(status="stalled", error=f"no training step for {idle:.0f} s")
            self.on_stall()
        finally:
            self.exit(self.EXIT_STALLED)


def thread_stacks() -> dict[str, str]:
    """Every thread's current stack, by thread name."""
    frames = sys._current_frames()
    return {
        f"{thread.name} ({thread.ident})": "".join(traceback.format_stack(frames[thread.ident]))
        for thread in threading.enumerate()
        if thread.ident in frames
    }


class LeaseKeeper(PeriodicThread):
    """Renews the run's lease every quarter of its TTL, counted from one renewal's sending to the
    next's (docs/storage.md). While no renewal gets through
    (the store is away) the lease lapses: the store's fence holds every write to the run back
    and training goes on. When the lease is lost (another writer took it) this thread logs why
    and ends the process with exit 75: the fence has already stopped every write, and a restart
    later waits for the run's writer like any other start. A main thread deep in a long phase
    cannot be asked to raise, so the exit comes from this thread."""

    name = "lease"
    EXIT_ANOTHER_WRITER = EXIT_TRY_LATER

    def __init__(self, lease: Lease, exit: Callable[[int], None] = end_process):
        """``exit``: the real one in a run; tests pass one that records."""
        super().__init__(interval=lease.ttl * RENEW_SHARE)
        self.lease, self.exit = lease, exit
        self._told_lapse = False
        self._failing = False  # the last renewal failed
        self._log = structlog.get_logger("job.lease")

    def _run(self) -> None:
        # A quarter TTL from one renewal's sending to the next's, whatever its round trip took; a
        # quarter TTL between tries while renewals fail (the store is away).
        while not self._stop.wait(self.interval if self._failing else max(0.0, self.lease.renew_in())):
            self.tick()

    def tick(self) -> None:
        self._failing = True
        try:
            self.lease.renew()
            self._failing = False
            self._told_lapse = False
        except LeaseLost as exc:
            if self._stop.is_set():  # the attempt is over and released the lease itself
                return
            self._log.error("lease.lost", error=str(exc), exit_code=self.EXIT_ANOTHER_WRITER)
            self._stop.set()
            self.exit(self.EXIT_ANOTHER_WRITER)
        except Exception as exc:  # the store is away: the next renewal may get through
            lapsed = self.lease.lapsed_for()
            if lapsed is not None and not self._told_lapse:
                self._told_lapse = True
                self._log.warning("lease.lapsed", error=f"{type(exc).__name__}: {exc}", holding="writes to the run")
            else:
                self._log.warning("lease.renew_failed", error=f"{type(exc).__name__}: {exc}")
