"""How a run ends when it must (SPEC §7, §8): a watchdog for a run that stopped making
progress (exit 75), and SIGTERM / SIGINT as a request to save and exit 143."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from job.monitoring.progress import PeriodicThread, Progress
from job.storage.lease import RENEW_SHARE, Lease, LeaseLost


def end_process(code: int) -> None:
    """Flush the logs and end the process at once, from any thread (a hung main thread cannot
    be asked to raise)."""
    logging.shutdown()
    os._exit(code)


class Watchdog(PeriodicThread):
    """Ends a run that has stopped making progress (SPEC §8).

    When no ``touch()`` arrives for ``limit`` seconds it logs every thread's stack, marks the
    run ``stalled``, gives ``on_stall`` (e.g. a bounded upload flush) its chance, and ends the
    process with exit 75 so that the restart policy starts it again. A hung main thread cannot
    raise, so the exit comes from this thread."""

    name = "watchdog"
    EXIT_STALLED = 75

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


class Stopped(BaseException):
    """SIGTERM or SIGINT asked the process to stop, and it did at a safe point (exit 143).

    A BaseException, like KeyboardInterrupt: the handlers that catch Exception to go on (a
    verifier's check, a heartbeat) must not swallow a request to stop."""


class StopRequest:
    """SIGTERM / SIGINT as a request to stop at the next safe point, for the whole process.

    The command line installs one around every mode. The training loop asks ``requested`` after
    each step, saves and exits 143; every other long phase (generating or downloading data,
    verifying checkpoints, evaluating, sampling) calls ``stop_point`` at its natural boundaries
    (a shard, a file, a checkpoint, a batch), which raises ``Stopped``. Between boundaries the
    work in hand finishes, so nothing is left half-written.

    A second signal while the first is being honoured changes nothing; `docker stop` sends
    SIGKILL after its grace period anyway."""

    EXIT_CODE = 143
    active: "StopRequest | None" = None  # the one installed in this process, if any

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        self._outer, StopRequest.active = StopRequest.active, self
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        StopRequest.active = self._outer

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            structlog.get_logger("job.signals").warning("signal.received", signal=self.signal_name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def check(self, phase: str) -> None:
        if self.requested:
            raise Stopped(f"stopped by {self.signal_name} while {phase}")


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """The process's StopRequest: the installed one, else a new one for the block (a caller
    that runs ``train`` without the command line)."""
    if StopRequest.active is not None:
        yield StopRequest.active
    else:
        with StopRequest() as stop:
            yield stop


def stop_point(phase: str) -> None:
    """A natural boundary of a long phase: raise Stopped if a stop signal has arrived.
    ``phase`` completes the sentence "stopped by SIGTERM while ...". """
    if StopRequest.active is not None:
        StopRequest.active.check(phase)


WAITING_FOR_STORE = "waiting for the run URI to answer"


def sleep_unless_stopped(phase: str, slice_seconds: float = 0.25) -> Callable[[float], None]:
    """A sleep for the waits of a long phase (a store that does not answer, another writer's
    lease): a stop signal ends it within ``slice_seconds`` by raising Stopped, so that a job
    waiting for minutes still exits 143 within docker stop's grace period."""

    def sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            stop_point(phase)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, slice_seconds))

    return sleep


class LeaseKeeper(PeriodicThread):
    """Renews the run's lease every quarter of its TTL (SPEC §10). While no renewal gets through
    (the store is away) the lease lapses: the store's fence holds every write to the run back
    and training goes on. When the lease is lost (another writer took it) this thread logs why
    and ends the process with exit 75: the fence has already stopped every write, and a restart
    later waits for the run's writer like any other start. A main thread deep in a long phase
    cannot be asked to raise, so the exit comes from this thread."""

    name = "lease"
    EXIT_ANOTHER_WRITER = 75

    def __init__(self, lease: Lease, exit: Callable[[int], None] = end_process):
        """``exit``: the real one in a run; tests pass one that records."""
        super().__init__(interval=lease.ttl * RENEW_SHARE)
        self.lease, self.exit = lease, exit
        self._told_lapse = False
        self._log = structlog.get_logger("job.lease")

    def tick(self) -> None:
        try:
            self.lease.renew()
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
