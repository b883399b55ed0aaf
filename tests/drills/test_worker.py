"""Helper processes (job.worker): requests from several threads in flight at once, answered by
number; raw payloads arrive whole; a worker that dies fails what it left unanswered."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pytest

from job.runtime.workers import WorkerGone, WorkerProcess

pytestmark = pytest.mark.timeout(60)


def answered_in_order(worker: WorkerProcess) -> list[str]:
    """A slow request, then (once it is in flight) a quick one from another thread; the order in
    which the worker finished them (its own count: the two requesting threads may wake in
    either order when the answers arrive together)."""
    finished: dict[str, int] = {}
    slow = threading.Thread(target=lambda: finished.update(slow=worker.request({"sleep": 2.0})["finished"]))
    slow.start()
    time.sleep(1.0)  # the slow one is sent first (well within its 2 s, even on a loaded machine)
    finished["quick"] = worker.request({"sleep": 0.0})["finished"]
    slow.join()
    return sorted(finished, key=finished.get)


@pytest.mark.parametrize("concurrency, order", [(2, ["quick", "slow"]), (1, ["slow", "quick"])])
def test_a_worker_serving_two_at_once_answers_a_quick_request_beside_a_slow_one(concurrency, order):
    worker = WorkerProcess("tests.drills.sleepy_worker", (str(concurrency),))
    worker.start()
    try:
        worker.request({"sleep": 0.0})  # started and answering
        assert answered_in_order(worker) == order
    finally:
        worker.stop()


def test_a_payload_arrives_whole():
    worker = WorkerProcess("tests.drills.sleepy_worker", ("1",))
    try:
        payload = os.urandom(3 << 20)  # more than a pipe holds at once
        reply = worker.request({"sleep": 0.0}, payload)
        assert (reply["size"], reply["sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest())
    finally:
        worker.stop()


def test_a_killed_worker_fails_the_request_in_flight_and_the_next_request_starts_another():
    worker = WorkerProcess("tests.drills.sleepy_worker", ("2",))
    try:
        worker.request({"sleep": 0.0})
        first = worker.pid
        threading.Timer(0.5, os.kill, (first, signal.SIGKILL)).start()
        with pytest.raises(WorkerGone):
            worker.request({"sleep": 10.0})
        assert worker.request({"sleep": 0.0})["slept"] == 0.0
        assert worker.pid not in (None, first)
    finally:
        worker.stop()
    with pytest.raises(WorkerGone):
        worker.request({"sleep": 0.0})  # stopped for good
