"""Helper processes that keep pure-Python work off the training process's interpreter lock.

The training step runs kernels without the GIL but needs it back between them; a thread of the
same process that runs Python for long (matplotlib drawing a figure, botocore building, signing
and parsing a request) makes it wait. Such work therefore runs in ``python -m <module> [args]``,
a child that answers requests read from its stdin, one JSON line per request and per answer (no
pickle, even between our own processes), matched by number. A request may carry raw bytes: its
line says how many ("payload" in the message), and they follow it.

A child lives exactly as long as its requester holds its stdin open: when the requester closes
it, or dies (even by SIGKILL), the child exits at once, dropping any request in flight, as the
requester's own threads would have been.

A child says one line ({"serving": true}) once its imports are done and it serves. Its stderr
passes through the requester's, and a child that ends unasked is logged (``worker.exited``) with
its exit code and the last lines of its stderr; one that ends before it served (an import error)
is broken for good: it is not started again, and every request says why at once.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import structlog

log = structlog.get_logger("job.worker")

STDERR_LINES = 20  # of a child's stderr, kept for the report of its end


class WorkerGone(RuntimeError):
    """The worker process ended (or was stopped) while a request was in flight."""


class WorkerBroken(RuntimeError):
    """The worker ended before it served anything (an error at start, e.g. an import error):
    starting it again would end the same way. The message names its exit code and stderr."""


class WorkerError(RuntimeError):
    """The worker could not do what was asked; the message is its own ("ValueError: ...")."""


class _Child:
    """One process of a worker, with what its requester learns of it."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self.serving = False
        self.settled = threading.Event()  # serving, or ended
        self.stderr_read = threading.Event()

    def ending(self, module: str, code: int) -> str:
        tail = "".join(self.stderr).strip()
        return f"{module} (pid {self.proc.pid}) exited with {code}" + (f": {tail}" if tail else "")


# --- the requester's side ------------------------------------------------------------------


class WorkerProcess:
    """``python -m <module> [args]``, started by ``start()`` or the first request, and again by
    the first request after it died. Several threads may have requests in flight at once; how
    many the worker works on together is its own choice (``serve``'s ``concurrency``)."""

    def __init__(self, module: str, args: tuple[str, ...] = ()):
        self.module, self.args = module, args
        self._child: _Child | None = None
        self._lock = threading.Lock()  # the process, the pipe to it and the table of requests in flight
        self._in_flight: dict[int, tuple[subprocess.Popen, Future]] = {}
        self._numbers = itertools.count()
        self._stopped = False
        self._broken: WorkerBroken | None = None

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.proc.pid if child is not None and child.proc.poll() is None else None

    def start(self) -> None:
        """Start the worker now rather than with the first request (its imports then overlap
        whatever the requester does meanwhile)."""
        with self._lock:
            if not self._stopped and self._broken is None:
                self._running()

    def check_started(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the worker to serve; WorkerBroken if it ended first.
        (One still importing after that is left to its first request.)"""
        with self._lock:
            if self._broken is None and not self._stopped:
                self._running()
            child = self._child
        if child is not None:
            child.settled.wait(timeout)
        if self._broken is not None:
            raise self._broken

    def request(self, message: dict[str, Any], payload: bytes | None = None) -> dict[str, Any]:
        """Send ``message`` (and ``payload``, raw bytes) and return the answer; WorkerError if the
        worker answered with an error, WorkerGone if it died or was stopped before answering,
        WorkerBroken if it cannot start."""
        answer: Future = Future()
        with self._lock:
            if self._stopped:
                raise WorkerGone(f"{self.module} was stopped")
            if self._broken is not None:
                raise self._broken
            proc = self._running()
            number = next(self._numbers)
            header = {**message, "id": number, **({"payload": len(payload)} if payload is not None else {})}
            self._in_flight[number] = (proc, answer)
            try:
                proc.stdin.write((json.dumps(header) + "\n").encode())
                if payload is not None:
                    proc.stdin.write(payload)
                proc.stdin.flush()
            except (OSError, ValueError) as exc:  # a broken pipe, or stdin closed by stop()
                del self._in_flight[number]
                proc.kill()
                raise WorkerGone(f"{self.module} (pid {proc.pid}) is gone: {exc}") from exc
        reply = answer.result()
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply

    def stop(self, timeout: float = 0.0) -> None:
        """End the worker (and any request in flight); later requests raise WorkerGone."""
        with self._lock:
            self._stopped = True
            proc = self._child.proc if self._child else None
        if proc is None:
            return
        try:
            proc.stdin.close()  # the worker exits when it sees the end of its input
            proc.wait(timeout=max(timeout, 0.2))
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def _running(self) -> subprocess.Popen:
        if self._child is None or self._child.proc.poll() is not None:
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            self._child = child = _Child(proc)
            threading.Thread(target=self._stderr, args=(child,), name="worker-stderr", daemon=True).start()
            threading.Thread(target=self._answers, args=(child,), name="worker-answers", daemon=True).start()
        return self._child.proc

    @staticmethod
    def _stderr(child: _Child) -> None:
        """Pass the child's stderr through to ours, keeping its last lines for the report of its end."""
        try:
            for raw in child.proc.stderr:
                line = raw.decode(errors="replace")
                child.stderr.append(line)
                sys.stderr.write(line)
        finally:
            child.stderr_read.set()

    def _answers(self, child: _Child) -> None:
        """Hand each answer of the child to its request; when it ends, fail what it left
        unanswered, and report an end nobody asked for."""
        proc = child.proc
        try:
            for line in proc.stdout:
                reply = json.loads(line)
                if "id" not in reply:  # {"serving": true}: its imports are done
                    child.serving = True
                    child.settled.set()
                    continue
                with self._lock:
                    _, answer = self._in_flight.pop(reply.pop("id"))
                answer.set_result(reply)
        finally:
            code = proc.wait()
            child.stderr_read.wait(5)  # the last lines come with the end of the pipe
            ending = child.ending(self.module, code)
            with self._lock:
                asked = self._stopped
                if not child.serving and not asked:
                    self._broken = WorkerBroken(f"{ending} before it served: it is not started again")
                lost = [n for n, (p, _) in self._in_flight.items() if p is proc]
                answers = [self._in_flight.pop(n)[1] for n in lost]
            child.settled.set()
            if not asked:  # a killed worker that served is started again by the next request; a broken one is not
                (log.warning if child.serving else log.error)(
                    "worker.exited", module=self.module, pid=proc.pid, exit_code=code, served=child.serving,
                    stderr=list(child.stderr),
                )
            for answer in answers:
                answer.set_exception(self._broken or WorkerGone(ending))


# --- the worker's side ---------------------------------------------------------------------


def run_in_idle_time() -> None:
    """Let this process have only CPU time nobody else wants: SCHED_IDLE (Linux), so that a
    training thread waking up takes the core back at once; nice 19 where that is refused."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def serve(handle: Callable[[dict[str, Any]], dict[str, Any]], concurrency: int = 1) -> None:
    """Answer each request with ``handle``'s answer, or {"error": text} if it raised, working on
    up to ``concurrency`` at once (one: in the order they came). A request's payload reaches
    ``handle`` as bytes under "payload"."""
    # Ctrl-C or a SIGTERM may reach the whole process group: the requester decides what happens,
    # and the worker ends with its input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print, from Python or C, must not corrupt the answers
    sys.stdout = sys.stderr
    writing = threading.Lock()

    def answer(message: dict[str, Any]) -> None:
        number = message.pop("id")
        try:
            reply = handle(message)
        except Exception as exc:  # the requester decides what an error means; serve the next
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        with writing:
            answers.write((json.dumps({**reply, "id": number}) + "\n").encode())
            answers.flush()

    answers.write(b'{"serving": true}\n')
    answers.flush()
    workers = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="request")
    source = sys.stdin.buffer
    while line := source.readline():
        message = json.loads(line)
        if "payload" in message:
            size, message["payload"] = message["payload"], source.read(message["payload"])
            if len(message["payload"]) < size:  # cut off by the requester's end: never act on part of it
                break
        workers.submit(answer, message)
    os._exit(0)  # the requester closed its end, or died: nothing more is wanted
