"""Helper processes (job.worker): requests from several threads in flight at once, answered by
number; raw payloads arrive whole; a worker that dies fails what it left unanswered."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pytest
import structlog

from job.runtime.workers import WorkerBroken, WorkerGone, WorkerProcess
from job.storage.uploader import Lane, Op
from tests.helpers import RecordingFolder, poll_until

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


def test_a_worker_that_cannot_start_says_why_once_and_is_not_started_again():
    worker = WorkerProcess("tests.drills.broken_worker")
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(WorkerBroken) as broken:
            worker.request({"sleep": 0.0})
        started = time.monotonic()
        with pytest.raises(WorkerBroken):
            worker.request({"sleep": 0.0})  # at once, without another process
        assert time.monotonic() - started < 0.5
        with pytest.raises(WorkerBroken):
            worker.check_started(timeout=10)
    assert "cannot import name 'serve_nothing'" in str(broken.value) and "exited with 1" in str(broken.value)
    exited = [e for e in logs if e["event"] == "worker.exited"]
    assert len(exited) == 1, exited  # one process, one report
    assert exited[0]["exit_code"] == 1 and exited[0]["log_level"] == "error"
    assert any("ImportError: cannot import name 'serve_nothing'" in line for line in exited[0]["stderr"])


class BrokenSender(RecordingFolder):
    """A run URI whose writes go through a worker that cannot start (as WorkerFolder's do)."""

    def __init__(self, root):
        super().__init__(root)
        self.worker = WorkerProcess("tests.drills.broken_worker")

    def write_bytes(self, rel, data):
        self.worker.request({"op": "write_bytes", "rel": rel}, data)


def test_an_upload_lane_whose_worker_cannot_start_stops_at_once_instead_of_retrying(tmp_path):
    local = RecordingFolder(tmp_path / "cache")
    local.write_bytes("checkpoints/latest.json", b"{}")
    lane = Lane("ordered", local, BrokenSender(tmp_path / "run"), max_wait=0.1)
    with structlog.testing.capture_logs() as logs:
        lane.submit(Op("put", "checkpoints/latest.json"))
        poll_until(lambda: any(e["event"] == "upload.stopped" for e in logs), 10, "the lane to give up")
        time.sleep(0.5)  # time enough for a retry, were there one
    events = [e["event"] for e in logs]
    assert events.count("upload.stopped") == 1 and "upload.retry" not in events, events
    assert events.count("worker.exited") == 1
    assert lane.backlog() == ["checkpoints/latest.json"]  # kept for the next attempt
