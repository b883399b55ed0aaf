"""Mirrors a local working copy to a remote folder in the background (docs/storage.md), so that a slow
or dead bucket never blocks a training step: retries with backoff and jitter (tenacity), in two
lanes so that a large checkpoint never holds back a heartbeat, both sending through one worker
process (job.storage.upload_worker) so that the S3 client's Python stays out of the training
process."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_exponential_jitter,
)

from job.runtime.workers import WorkerBroken, WorkerError, WorkerGone, WorkerProcess
from job.storage.folders import Folder, StorageError, delete_remote_tree, describe
from job.storage.layout import Layout
from job.storage.lease import LeaseLost

log = structlog.get_logger("job.storage")


@dataclass(frozen=True)
class Op:
    kind: str  # "put" | "delete_tree"
    rel: str
    first: tuple[str, ...] = ()  # delete_tree: the file names deleted before the rest
    known: tuple[str, ...] | None = None  # delete_tree: every file name of the folder, when known (no listing)
    data: bytes | None = None  # put: these bytes rather than the local file's (which could not be written)


class Lane:
    """One background thread delivering operations to the remote folder in order.

    Submitting an operation on a path that is already waiting moves it to the back of the line
    (its content is read when it is sent, so the newest content goes and goes once)."""

    def __init__(
        self, name: str, local: Folder, remote: Folder, max_wait: float, pause: float = 0.0,
        clock: Callable[[], float] = time.monotonic, guard: Callable[[], None] = lambda: None,
    ):
        """``pause``: a file is sent again no sooner than this after its last send (unless someone
        waits for a flush), so that a file rewritten many times a second goes once per pause,
        while a file not sent lately (the first progress of an attempt) goes at once."""
        self.name, self.local, self.remote, self.max_wait, self.pause = name, local, remote, max_wait, pause
        self.clock = clock  # the pause's clock; tests pass a fake one
        # Before each send: LeaseLost ends the lane (another writer owns the run); LeaseLapsed
        # (no lease renewal got through lately) is retried like a store error.
        self.guard = guard
        self._pending: OrderedDict[str, Op] = OrderedDict()
        self._cond = threading.Condition()
        self._busy = False
        self._last_sent: dict[str, float] = {}
        self._flushers = 0
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"upload-{name}", daemon=True)
        self._thread.start()

    def submit(self, op: Op) -> None:
        with self._cond:
            self._pending.pop(op.rel, None)
            self._pending[op.rel] = op
            self._cond.notify_all()

    def backlog(self) -> list[str]:
        with self._cond:
            return list(self._pending)

    def wait_idle(self, deadline: float) -> bool:
        with self._cond:
            self._flushers += 1
            self._cond.notify_all()  # ends a rest
            try:
                while self._pending or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._flushers -= 1

    def abandon(self) -> None:
        """Stop retrying: the process is about to exit with what it could deliver."""
        self._abandon.set()
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._abandon.is_set():
                    rel, wait = self._next_due()
                    if rel is not None:
                        break
                    self._cond.wait(wait)
                if self._abandon.is_set():
                    return
                op = self._pending[rel]
                self._busy = True
            delivered = self._deliver(op)
            with self._cond:
                if delivered and self._pending.get(rel) is op:
                    del self._pending[rel]
                if self.pause:
                    self._last_sent[rel] = self.clock()
                self._busy = False
                self._cond.notify_all()

    def _next_due(self) -> tuple[str | None, float | None]:
        """The oldest waiting path that may be sent now, else (None, seconds until one may)."""
        if not self._pending:
            return None, None
        now, soonest = self.clock(), math.inf
        for rel in self._pending:
            due = self._last_sent.get(rel, -math.inf) + self.pause
            if due <= now or self._flushers:
                return rel, None
            soonest = min(soonest, due - now)
        return None, soonest

    def _deliver(self, op: Op) -> bool:
        retrying = Retrying(
            wait=wait_exponential_jitter(multiplier=0.5, max=self.max_wait),
            retry=retry_if_exception_type(Exception) & retry_if_not_exception_type((LeaseLost, WorkerBroken)),
            stop=lambda state: self._abandon.is_set(),
            sleep=self._abandon.wait,  # an abandon ends the wait at once
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            retrying(self._apply, op)
            return True
        except LeaseLost as exc:  # another writer owns the run now: nothing more goes out
            self._abandon.set()
            log.error("upload.fenced", lane=self.name, path=op.rel, error=str(exc))
            return False
        except WorkerBroken as exc:  # the sender cannot start (its log says why): no retry can help
            self._abandon.set()
            log.error("upload.stopped", lane=self.name, path=op.rel, error=str(exc))
            return False
        except Exception as exc:  # only reached once abandoned
            log.error("upload.abandoned", lane=self.name, path=op.rel, error=describe(exc))
            return False

    def _apply(self, op: Op) -> None:
        self.guard()
        if op.kind == "put":
            data = op.data if op.data is not None else self.local.read_bytes(op.rel)
            if data is not None:  # gone locally: a later delete will follow it
                self.remote.write_bytes(op.rel, data)
        elif op.kind == "delete_tree":
            delete_remote_tree(self.remote, op.rel, op.first, op.known)

    def _log_retry(self, state: RetryCallState) -> None:
        op = state.args[0]
        log.warning(
            "upload.retry", lane=self.name, path=op.rel, attempt=state.attempt_number,
            wait_seconds=round(state.upcoming_sleep, 2), error=describe(state.outcome.exception()),
        )


class Uploader:
    """Mirrors the local working copy to the remote folder in the background: one lane for
    files whose order matters (checkpoints, data), one for live files (progress, logs, plots),
    so that a large checkpoint never holds back a heartbeat (``remote`` must take a request of
    each at once, as WorkerFolder does)."""

    def __init__(
        self, local: Folder, remote: Folder, max_wait: float, live_pause: float = 0.0,
        guard: Callable[[], None] = lambda: None,
    ):
        self.ordered = Lane("ordered", local, remote, max_wait, guard=guard)
        # Every request costs CPU (the S3 client's, and the store's): progress and logs,
        # rewritten several times a second, rest between sends.
        self.live = Lane("live", local, remote, max_wait, pause=live_pause, guard=guard)

    def lane(self, rel: str) -> Lane:
        return self.ordered if rel.startswith(Layout.ordered_prefixes) else self.live

    def submit(self, op: Op) -> None:
        self.lane(op.rel).submit(op)

    def flush(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for the backlog to drain; return what is left."""
        deadline = time.monotonic() + timeout
        self.ordered.wait_idle(deadline)
        self.live.wait_idle(deadline)
        return self.ordered.backlog() + self.live.backlog()

    def abandon(self) -> None:
        self.ordered.abandon()
        self.live.abandon()


class WorkerFolder:
    """The writes of a RemoteFolder (what an upload lane needs: write, delete, list to delete),
    made by one worker process for both lanes, which works on a request of each at once. It
    starts at once, so that its imports and its S3 client's set-up overlap the job's own start.
    A failed request raises StorageError with the store's words; a worker that died is started
    again by the next request (the lane retries), unless it died before it served (WorkerBroken)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._worker = WorkerProcess("job.storage.upload_worker", (uri,))
        self._worker.start()

    @property
    def pid(self) -> int | None:
        return self._worker.pid

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._ask({"op": "write_bytes", "rel": rel}, data)

    def delete(self, rel: str) -> None:
        self._ask({"op": "delete", "rel": rel})

    def delete_many(self, rels: list[str]) -> None:
        self._ask({"op": "delete_many", "rels": rels})

    def list_files(self, rel: str) -> list[str]:
        return self._ask({"op": "list_files", "rel": rel})["files"]

    def check_started(self, timeout: float) -> None:
        """Raise StorageError with the worker's own words (exit code, stderr) if it cannot start."""
        try:
            self._worker.check_started(timeout)
        except WorkerBroken as exc:
            raise StorageError(f"the upload worker for {self.uri} cannot start: {exc}") from None

    def close(self, timeout: float = 0.0) -> None:
        """End the worker; a request in flight is dropped (an S3 PUT is all or nothing)."""
        self._worker.stop(timeout)

    def _ask(self, message: dict[str, Any], payload: bytes | None = None) -> dict[str, Any]:
        try:
            return self._worker.request(message, payload)
        except (WorkerError, WorkerGone) as exc:
            raise StorageError(str(exc)) from None
