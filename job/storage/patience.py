"""How long a process waits out a store that does not answer (docs/storage.md): the one rule every
synchronous request to a run URI follows, at start-up as at a stage transition or the end.

A request that fails transiently (a refused connection, a timeout, a reset, a 5xx, SlowDown) is
tried again with exponential backoff and jitter for up to ``seconds``, each failure logged as
``storage.unreachable``; only then does StorageError name the store. A refusal for good
(StoreRefused) and an answer (WriteConflict: someone else's write won) are never retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import structlog
from tenacity import Retrying, retry_if_not_exception_type, wait_exponential_jitter

from job.runtime.signals import WAITING_FOR_STORE, sleep_unless_stopped
from job.storage.folders import StorageError, WriteConflict, describe, retry_transient

T = TypeVar("T")

log = structlog.get_logger("job.storage")

# The longest pause between two tries: a store back after an outage is noticed within this.
MAX_PAUSE_SECONDS = 5.0


class Patience:
    """Rides out an outage of the store at ``uri`` of up to ``seconds``. ``sleep`` waits between
    tries (by default one that a stop signal ends with Stopped, so that a job waiting for the
    store still exits 143 within docker stop's grace period); ``clock`` measures the ``seconds``
    (tests pass fake ones of both)."""

    def __init__(
        self, uri: str, seconds: float, sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.uri, self.seconds, self.clock = uri, seconds, clock
        self.sleep = sleep or sleep_unless_stopped(WAITING_FOR_STORE)

    def __call__(self, request: Callable[[], T]) -> T:
        """``request()``'s answer, once the store gives one; StorageError naming the store when
        it has not answered for ``seconds``."""
        deadline = self.clock() + self.seconds
        retrying = Retrying(
            retry=retry_transient & retry_if_not_exception_type(WriteConflict),
            wait=wait_exponential_jitter(multiplier=0.5, max=MAX_PAUSE_SECONDS),
            sleep=self.sleep,
            stop=lambda state: self.clock() >= deadline,
            before_sleep=lambda state: log.warning(
                "storage.unreachable", uri=self.uri, attempt=state.attempt_number,
                error=describe(state.outcome.exception()),
            ),
            reraise=True,
        )
        try:
            return retrying(request)
        except (StorageError, WriteConflict):
            raise
        except Exception as exc:
            raise StorageError(
                f"run URI {self.uri} is not reachable after {self.seconds:.0f} s "
                f"(storage.connect_seconds): {describe(exc)}"
            ) from exc
