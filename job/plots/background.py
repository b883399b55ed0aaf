"""Plots drawn in a separate process, so that rendering never competes with training for the GIL
(docs/benchmarks.md has what a figure drawn on a thread cost). The training process only hands
over arrays; ``job.plots.worker``, in its own process, imports matplotlib and renders. This
module imports neither matplotlib nor torch. Arrays travel as base64 of their float32 bytes.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog

from job.runtime.workers import WorkerGone, WorkerProcess

log = structlog.get_logger("job.plots")

WORKER = "job.plots.worker"
IDLE = "--idle"  # the worker's argument: draw only on CPU time nothing else wants
# At the end of a run, how long the idle worker may take over what is left before a worker at
# normal priority takes it over (on a loaded machine an idle one may never get a core).
IDLE_GRACE_SECONDS = 2.0

# --- the wire format ----------------------------------------------------------------------


def encode_request(plot: str, **arguments: Any) -> dict[str, Any]:
    """One request: which plot (a name in job.plots.charts.RENDERERS) and its arguments."""
    return {"plot": plot, "arguments": {k: _encode(v) for k, v in arguments.items()}}


def decode_request(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return request["plot"], {k: _decode(v) for k, v in request["arguments"].items()}


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value, dtype=np.float32)
        return {"float32": base64.b64encode(array.tobytes()).decode("ascii"), "shape": list(array.shape)}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"float32", "shape"}:
        return np.frombuffer(base64.b64decode(value["float32"]), dtype=np.float32).reshape(value["shape"])
    return value


# --- the training process's side ----------------------------------------------------------


class BackgroundPlots:
    """Hands plot requests to a worker process from a thread of its own, and stores the PNGs.

    Each target file has one slot: a newer request replaces one not yet drawn (only the newest
    picture matters), so a slow renderer can never build a queue. The worker starts with the
    first request (off the training thread) and is started again if it dies; a failed plot is
    logged and never ends a run."""

    def __init__(self, write: Callable[[str, bytes], None]):
        self._write = write
        self._slots: dict[str, tuple[Callable[[str, bytes], None], dict[str, Any]]] = {}
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._worker = WorkerProcess(WORKER, (IDLE,))
        self._replacing = False
        self._thread = threading.Thread(target=self._run, name="plots", daemon=True)
        self._thread.start()

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid

    def submit(self, rel: str, plot: str, **arguments: Any) -> None:
        """Ask for ``plot`` (a job.plots.charts.RENDERERS name) to be drawn into ``rel``."""
        self.submit_to(rel, self._write, plot, **arguments)

    def submit_to(self, key: str, deliver: Callable[[str, bytes], None], plot: str, **arguments: Any) -> None:
        """Ask for ``plot`` to be drawn and handed to ``deliver(key, png)``; a newer request of the
        same ``key`` replaces one not yet drawn."""
        request = encode_request(plot, **arguments)
        with self._cond:
            self._slots[key] = (deliver, request)
            self._cond.notify_all()

    def finish(self, timeout: float) -> None:
        """The end of a run: draw what is pending within ``timeout``, on CPU time of its own if
        the idle worker has not drawn it within IDLE_GRACE_SECONDS, then stop the worker."""
        with self._cond:
            self._cond.wait_for(lambda: not (self._slots or self._busy), min(timeout, IDLE_GRACE_SECONDS))
            pending = bool(self._slots or self._busy)
            if pending:
                # A drawing in flight on the idle worker fails with WorkerGone and is asked again
                # of this one (see _render).
                idle, self._worker, self._replacing = self._worker, WorkerProcess(WORKER), True
        if pending:
            idle.stop()
        self.close(timeout)

    def close(self, timeout: float) -> None:
        """Draw what is pending (within ``timeout``), then stop the worker."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._slots or self._busy) and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            self._closed = True
            self._cond.notify_all()
        self._worker.stop(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._slots and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                rel = next(iter(self._slots))  # the oldest first: pictures of epochs in their order
                deliver, request = self._slots.pop(rel)
                self._busy = True
            try:
                deliver(rel, self._render(request))
            except Exception as exc:  # a plot is never worth a run
                log.warning("plot.failed", path=rel, error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _render(self, request: dict[str, Any]) -> bytes:
        """The PNG for one request; a worker found dead (killed, out of memory) is replaced once."""
        try:
            answer = self._worker.request(request)
        except WorkerGone as exc:
            if self._closed:  # stopped by close(), not lost
                raise
            if not self._replacing:  # finish() did not replace it on purpose: it died
                log.warning("plot.worker_restarted", reason=str(exc))
            answer = self._worker.request(request)
        return base64.b64decode(answer["png"])
