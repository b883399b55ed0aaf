"""Plots drawn in a separate process, so that rendering never competes with training for the GIL.

matplotlib is pure-Python-heavy: drawn on a thread of the training process, one reconstruction
grid holds the interpreter lock for a few hundred milliseconds, and the training step, which
needs the lock between its kernels, waits (bench/bench_overhead.py measured it). The training
process therefore only hands over arrays; ``python -m job.plot_worker`` imports matplotlib and
renders. This module itself imports neither matplotlib nor torch.

The two talk over the worker's stdin and stdout, one JSON line per request and per answer;
arrays travel as base64 of their float32 bytes. No pickle, even between our own processes.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import structlog

log = structlog.get_logger("job.plots")

PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


# --- the wire format ----------------------------------------------------------------------


def encode_request(plot: str, **arguments: Any) -> bytes:
    """One request line: which plot (a name in job.plots.RENDERERS) and its arguments."""
    return (json.dumps({"plot": plot, "arguments": {k: _encode(v) for k, v in arguments.items()}}) + "\n").encode()


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    request = json.loads(line)
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


class WorkerGone(RuntimeError):
    """The worker process ended while a request was in flight."""


# --- the training process's side ----------------------------------------------------------


class BackgroundPlots:
    """Hands plot requests to a worker process from a thread of its own, and stores the PNGs.

    Each target file has one slot: a newer request replaces one not yet drawn (only the newest
    picture matters), so a slow renderer can never build a queue. The worker starts with the
    first request (off the training thread) and is started again if it dies; a failed plot is
    logged and never ends a run."""

    def __init__(self, write: Callable[[str, bytes], None]):
        self._write = write
        self._slots: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._worker: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="plots", daemon=True)
        self._thread.start()

    @property
    def worker_pid(self) -> int | None:
        worker = self._worker
        return worker.pid if worker is not None and worker.poll() is None else None

    def submit(self, rel: str, plot: str, **arguments: Any) -> None:
        """Ask for ``plot`` (a job.plots.RENDERERS name) to be drawn into ``rel``."""
        request = encode_request(plot, **arguments)
        with self._cond:
            self._slots[rel] = request
            self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Draw what is pending (within ``timeout``), then stop the worker."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._slots or self._busy) and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            self._closed = True
            self._cond.notify_all()
        self._stop_worker(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._slots and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                rel, request = self._slots.popitem()
                self._busy = True
            try:
                self._write(rel, self._render(request))
            except Exception as exc:  # a plot is never worth a run
                log.warning("plot.failed", path=rel, error=f"{type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _render(self, request: bytes) -> bytes:
        """The PNG for one request; a worker found dead (killed, out of memory) is replaced once."""
        try:
            return self._ask(self._running_worker(), request)
        except WorkerGone as exc:
            if self._closed:  # stopped by close(), not lost
                raise
            log.warning("plot.worker_restarted", reason=str(exc))
            return self._ask(self._running_worker(), request)

    @staticmethod
    def _ask(worker: subprocess.Popen, request: bytes) -> bytes:
        try:
            worker.stdin.write(request)
            worker.stdin.flush()
            line = worker.stdout.readline()
        except OSError as exc:  # BrokenPipeError among them
            worker.kill()
            worker.wait()
            raise WorkerGone(f"plot worker (pid {worker.pid}) is gone: {exc}") from exc
        if not line:
            raise WorkerGone(f"plot worker (pid {worker.pid}) exited with {worker.wait()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return base64.b64decode(answer["png"])

    def _running_worker(self) -> subprocess.Popen:
        if self._worker is None or self._worker.poll() is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}
            self._worker = subprocess.Popen(
                [sys.executable, "-m", "job.plot_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            )
        return self._worker

    def _stop_worker(self, timeout: float) -> None:
        worker = self._worker
        if worker is None:
            return
        try:
            worker.stdin.close()  # end of requests: the worker exits
            worker.wait(timeout=max(timeout, 0.2))  # an idle worker exits at once; a busy one is not waited for
        except (OSError, subprocess.TimeoutExpired):
            worker.kill()
            worker.wait()


# --- the worker's side --------------------------------------------------------------------


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """Answer each request line with one line: {"png": base64} or {"error": text}."""
    from job.plots import RENDERERS  # matplotlib: only in the worker

    for line in requests:
        try:
            plot, arguments = decode_request(line)
            answer = {"png": base64.b64encode(RENDERERS[plot](**arguments)).decode("ascii")}
        except Exception as exc:  # the requester logs it; the worker serves the next request
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write((json.dumps(answer) + "\n").encode())
        answers.flush()


def main() -> None:
    # Ctrl-C reaches the whole process group; the training process decides what happens, and the
    # worker ends when its stdin closes (also when the training process is killed).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A picture can wait; a training step should not: the worker gets only CPU that training leaves.
    os.nice(19)
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print, from Python or C, must not corrupt the answers
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    main()
