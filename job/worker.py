"""Helper processes that keep pure-Python work off the training process's interpreter lock.

The training step runs kernels without the GIL but needs it back between them; a thread of the
same process that runs Python for long (matplotlib drawing a figure) makes it wait. Such work
therefore runs in ``python -m <module>``, a child that answers requests read from its stdin,
one JSON line per request and per answer (no pickle, even between our own processes).

A child lives exactly as long as its requester holds its stdin open: when the requester closes
it, or dies (even by SIGKILL), the child exits at once, dropping any request in flight, as the
requester's own threads would have been.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any



class WorkerGone(RuntimeError):
    """The worker process ended (or was stopped) while a request was in flight."""


class WorkerError(RuntimeError):
    """The worker could not do what was asked; the message is its own ("ValueError: ...")."""


# --- the requester's side ------------------------------------------------------------------


class WorkerProcess:
    """``python -m <module>``, started by the first request and again by the first one after it
    died. Requests are answered one at a time, in the order they are made."""

    def __init__(self, module: str):
        self.module = module
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` and return the answer; WorkerError if the worker answered with an
        error, WorkerGone if it died or was stopped before answering."""
        line = (json.dumps(message) + "\n").encode()
        with self._lock:
            if self._stopped:
                raise WorkerGone(f"{self.module} was stopped")
            proc = self._running()
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
                answer = proc.stdout.readline()
            except (OSError, ValueError) as exc:  # a broken pipe, or stdin closed by stop()
                proc.kill()
                proc.wait()
                raise WorkerGone(f"{self.module} (pid {proc.pid}) is gone: {exc}") from exc
            if not answer:
                raise WorkerGone(f"{self.module} (pid {proc.pid}) exited with {proc.wait()}")
        reply = json.loads(answer)
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply

    def stop(self, timeout: float = 0.0) -> None:
        """End the worker (and any request in flight); later requests raise WorkerGone."""
        self._stopped = True
        proc = self._proc
        if proc is None:
            return
        try:
            proc.stdin.close()  # the worker exits when it sees the end of its input
            proc.wait(timeout=max(timeout, 0.2))
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def _running(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", self.module], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._proc


# --- the worker's side ---------------------------------------------------------------------


def serve(handle: Callable[[dict[str, Any]], dict[str, Any]], niceness: int) -> None:
    """Answer each request line with ``handle``'s answer, or {"error": text} if it raised."""
    # Ctrl-C reaches the whole process group; the requester decides what happens, and the
    # worker ends with its input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(niceness)
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print, from Python or C, must not corrupt the answers
    sys.stdout = sys.stderr
    requests: queue.Queue[bytes] = queue.Queue()

    def read() -> None:
        for line in sys.stdin.buffer:
            requests.put(line)
        os._exit(0)  # the requester closed its end, or died: nothing more is wanted

    threading.Thread(target=read, name="requests", daemon=True).start()
    while True:
        line = requests.get()
        try:
            answer = handle(json.loads(line))
        except Exception as exc:  # the requester decides what an error means; serve the next
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write((json.dumps(answer) + "\n").encode())
        answers.flush()
