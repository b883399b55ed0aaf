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
from dataclasses import dataclass, replace
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

# Requests in flight per lane: a store's round trip (ms on a local one, seconds on a distant or
# slow one) is then paid once per round of files rather than once per file. A checkpoint's data
# files go together; more would only queue at the store.
AT_ONCE = 4


@dataclass(frozen=True)
class Op:
    kind: str  # "put" | "delete_tree"
    rel: str
    first: tuple[str, ...] = ()  # delete_tree: the file names deleted before the rest
    known: tuple[str, ...] | None = None  # delete_tree: every file name of the folder, when known (no listing)
    data: bytes | None = None  # put: these bytes rather than the local file's (which could not be written)


class Lane:
    """Background threads delivering operations to the remote folder, several at once (a slow
    store's latency is paid once per round, not once per file), in order where order counts.

    Submitting an operation on a path that is already waiting moves it to the back of the line
    (its content is read when it is sent, so the newest content goes and goes once). An operation
    that ``commits`` (a manifest, latest.json, a delete) starts only once everything before it
    has arrived, and nothing after it starts before it has: so files arrive before the manifest
    that lists them, and the manifest before latest.json. A folder deleted while its files still
    wait (a checkpoint pruned before it was sent) drops them: they are never sent."""

    def __init__(
        self, name: str, local: Folder, remote: Folder, max_wait: float, pause: float = 0.0,
        clock: Callable[[], float] = time.monotonic, guard: Callable[[], None] = lambda: None,
        commits: Callable[[Op], bool] = lambda op: False, at_once: int = 1,
    ):
        """``pause``: a file is sent again no sooner than this after its last send (unless someone
        waits for a flush), so that a file rewritten many times a second goes once per pause,
        while a file not sent lately (the first progress of an attempt) goes at once.
        ``at_once``: how many requests the lane has in flight at most."""
        self.name, self.local, self.remote, self.max_wait, self.pause = name, local, remote, max_wait, pause
        self.clock = clock  # the pause's clock; tests pass a fake one
        # Before each send: LeaseLost ends the lane (another writer owns the run); LeaseLapsed
        # (no lease renewal got through lately) is retried like a store error.
        self.guard = guard
        self.commits = commits
        self._pending: OrderedDict[str, Op] = OrderedDict()  # in line, those in flight included
        self._sending: dict[str, Op] = {}  # in flight, by path
        self._reached: set[str] = set()  # paths of puts that have started: the run URI may hold them
        self._cond = threading.Condition()
        self._last_sent: dict[str, float] = {}
        self._flushers = 0
        self._abandon = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"upload-{name}-{i}", daemon=True) for i in range(at_once)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, op: Op) -> None:
        with self._cond:
            if op.kind == "delete_tree":
                op = self._drop_unsent(op)
                if op is None:
                    return
            self._pending.pop(op.rel, None)
            self._pending[op.rel] = op
            self._cond.notify_all()

    def _drop_unsent(self, op: Op) -> Op | None:
        """A folder is being deleted: its files that wait are never sent, and when none of its
        files ever started and the deleter wrote them all (``known``: no older copy can be at the
        run URI), the delete itself has nothing to do."""
        inside = f"{op.rel}/"
        dropped = [rel for rel in self._pending if rel.startswith(inside) and rel not in self._sending]
        for rel in dropped:
            del self._pending[rel]
        earlier = self._pending.get(op.rel)
        if earlier is not None and earlier.known is None:  # an earlier delete of whatever the run URI held there
            op = replace(op, known=None)
        if op.known is not None and not any(rel.startswith(inside) for rel in self._reached):
            if dropped:
                log.info("upload.never_sent", lane=self.name, path=op.rel, files=len(dropped))
            return None
        return op

    def backlog(self) -> list[str]:
        with self._cond:
            return list(self._pending)

    def wait_idle(self, deadline: float) -> bool:
        with self._cond:
            self._flushers += 1
            self._cond.notify_all()  # ends a rest
            try:
                while self._pending or self._sending:
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
                    op, wait = self._next_due()
                    if op is not None:
                        break
                    self._cond.wait(wait)
                if self._abandon.is_set():
                    return
                self._sending[op.rel] = op
                if op.kind == "put":
                    self._reached.add(op.rel)
            delivered = self._deliver(op)
            with self._cond:
                del self._sending[op.rel]
                if delivered and self._pending.get(op.rel) is op:
                    del self._pending[op.rel]
                if delivered and op.kind == "delete_tree":
                    self._reached = {rel for rel in self._reached if not rel.startswith(f"{op.rel}/")}
                if self.pause:
                    self._last_sent[op.rel] = self.clock()
                self._cond.notify_all()

    def _next_due(self) -> tuple[Op | None, float | None]:
        """The oldest waiting operation that may start now, else (None, seconds until one may)."""
        if any(self.commits(op) for op in self._sending.values()):
            return None, None  # nothing overtakes a commit in flight
        now, soonest = self.clock(), math.inf
        for position, (rel, op) in enumerate(self._pending.items()):
            if self.commits(op) and (position or self._sending):
                return None, (None if soonest == math.inf else soonest)  # it waits for all before it
            if rel in self._sending:
                continue  # in flight, or its older content is: one request per path at a time
            due = self._last_sent.get(rel, -math.inf) + self.pause
            if due <= now or self._flushers:
                return op, None
            soonest = min(soonest, due - now)
        return None, (None if soonest == math.inf else soonest)

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


def commits(op: Op) -> bool:
    """Whether ``op`` commits what was written before it (a manifest, latest.json) or removes a
    folder: the ordered lane sends it alone, after everything before it."""
    return op.kind == "delete_tree" or op.rel.rsplit("/", 1)[-1] in Layout.commit_files


class Uploader:
    """Mirrors the local working copy to the remote folder in the background: one lane for
    files whose order matters (checkpoints, data), one for live files (progress, logs, plots),
    so that a large checkpoint never holds back a heartbeat (``remote`` must take AT_ONCE
    requests of each at once, as WorkerFolder does)."""

    def __init__(
        self, local: Folder, remote: Folder, max_wait: float, live_pause: float = 0.0,
        guard: Callable[[], None] = lambda: None,
    ):
        self.ordered = Lane("ordered", local, remote, max_wait, guard=guard, commits=commits, at_once=AT_ONCE)
        # Every request costs CPU (the S3 client's, and the store's): progress and logs,
        # rewritten several times a second, rest between sends.
        self.live = Lane("live", local, remote, max_wait, pause=live_pause, guard=guard, at_once=AT_ONCE)

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
    made by one worker process for both lanes, which works on all their requests at once. It
    starts at once, so that its imports and its S3 client's set-up overlap the job's own start.
    A failed request raises StorageError with the store's words; a worker that died is started
    again by the next request (the lane retries), unless it died before it served (WorkerBroken)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._worker = WorkerProcess("job.storage.upload_worker", (uri, str(2 * AT_ONCE)))
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
