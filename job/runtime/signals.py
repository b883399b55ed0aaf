"""SIGTERM and SIGINT as a request to stop at the next safe point (exit 143), and the sleeps of
long waits that such a request ends at once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from job.exits import EXIT_PREEMPTED


class Stopped(BaseException):
    """SIGTERM or SIGINT asked the process to stop, and it did at a safe point (exit 143).

    A BaseException, like KeyboardInterrupt: the handlers that catch Exception to go on (a
    verifier's check, a heartbeat) must not swallow a request to stop."""

    exit_code, summary = EXIT_PREEMPTED, "preempted"


class StopRequest:
    """SIGTERM / SIGINT as a request to stop at the next safe point, for the whole process.

    The command line installs one around every mode. The training loop asks ``requested`` after
    each step, saves and exits 143; every other long phase (generating or downloading data,
    verifying checkpoints, evaluating, sampling) calls ``stop_point`` at its natural boundaries
    (a shard, a file, a checkpoint, a batch), which raises ``Stopped``. Between boundaries the
    work in hand finishes, so nothing is left half-written.

    A second signal while the first is being honoured changes nothing; `docker stop` sends
    SIGKILL after its grace period anyway."""

    EXIT_CODE = EXIT_PREEMPTED
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
