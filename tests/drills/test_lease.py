"""One writer per run (SPEC §10), as `train` processes on one run: an attempt killed before its
first upload still counts, a second one is refused and writes nothing, a kill -9 restart resumes
at once, and a paused writer whose lease was taken over exits without another write."""

from __future__ import annotations

import json
import signal

import pytest

from job.storage import Layout, LocalFolder, RemoteFolder
from job.storage.lease import Lease
from tests.helpers import (
    TOKENIZER_ONLY,
    JobProcess,
    assert_workers_end,
    gone,
    lease_doc,
    poll_until,
    run_job,
    worker_processes,
)

pytestmark = pytest.mark.timeout(120)

UPLOAD_WORKER = "job.storage.upload_worker"
TTL = 6.0


def test_an_attempt_killed_before_its_first_upload_is_still_counted(tmp_path):
    """Its lease, written at the run URI at once, is all it left: the next attempt is one more."""
    run = tmp_path / "run"
    dead = gone()
    killed = Lease(LocalFolder(run), TTL, machine=dead)
    killed.acquire(wait_seconds=0)
    killed.note_attempt(3)
    result = run_job("train", "--preset", "smoke", "--run-uri", str(run), "--set", "train.epochs=1", *TOKENIZER_ONLY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / Layout.progress).read_text())["attempt"] == 4
    assert (run / Layout.log_file(4)).exists()


# --- train processes on one run ------------------------------------------------------------------

LONG = ("--preset", "smoke", *TOKENIZER_ONLY, "--set", "train.epochs=30")  # runs until killed


class LocalRun:
    def __init__(self, tmp_path):
        self.uri = str(tmp_path / "run")
        self.folder = LocalFolder(self.uri)

    def start(self, name: str, *extra: str) -> JobProcess:
        return JobProcess.job("train", *LONG, "--run-uri", self.uri, *extra)


class BucketRun:
    """Each start is a new container: its own, empty cache."""

    def __init__(self, tmp_path, s3):
        self.s3, self.tmp_path = s3, tmp_path
        self.uri = s3.uri()
        self.folder = RemoteFolder(self.uri)

    def start(self, name: str, *extra: str) -> JobProcess:
        cache = str(self.tmp_path / f"cache-{name}")
        return JobProcess.job("train", *LONG, "--run-uri", self.uri, "--cache-dir", cache, *extra)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_train_is_refused_and_writes_nothing_then_a_kill_9_restart_resumes_at_once(where, tmp_path, request):
    run = LocalRun(tmp_path) if where == "local" else BucketRun(tmp_path, request.getfixturevalue("s3"))
    workers_before = worker_processes(UPLOAD_WORKER)
    first = run.start("first")
    try:
        assert first.wait_for('"train.progress"', timeout=120)
        # A start waiting for the lease is a long phase like any other: SIGTERM ends it (143).
        waiting = run.start("waiting")
        assert waiting.wait_for('"lease.busy"', timeout=90)
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(timeout=15) == 143
        assert "while waiting for the run's lease" in waiting.output
        # Its own lease time is short, so that it gives up soon; the holder's (6 s) decides.
        second = run.start("second", "--set", "storage.lease_seconds=0.2")
        assert second.wait(timeout=90) == 75
        assert second.events("lease.busy") and "another writer holds this run" in second.output
        assert not second.events("train.fresh_start") and not second.events("train.resumed")
        assert not second.events("checkpoint.snapshot")
        # The run is still the first attempt's alone: no log, progress or lease of the second.
        assert run.folder.list_dir(Layout.logs) == [Layout.log_file(1).rsplit("/", 1)[-1]]
        assert json.loads(run.folder.read_bytes(Layout.progress))["attempt"] == 1
        assert lease_doc(run.folder)["pid"] == first.proc.pid
        poll_until(lambda: run.folder.exists(Layout.tokenizer.latest), 60, "a committed checkpoint")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # The upload workers (s3) of all three ended with them, the SIGKILLed one's too.
    assert_workers_end(UPLOAD_WORKER, workers_before)

    third = run.start("third")
    try:
        assert third.wait_for('"train.resumed"', timeout=120)
        taken = third.events("lease.taken")
        assert taken[0]["reason"] == "holder process gone"  # the same machine: no TTL to wait
    finally:
        third.send_signal(signal.SIGKILL)
        third.wait(timeout=30)


def log_version(s3) -> str | None:
    """The ETag of the first attempt's log file in the bucket (None while it is not there)."""
    listing = s3.client.list_objects_v2(Bucket=s3.name, Prefix=f"run/{Layout.log_file(1)}")
    return next((obj["ETag"] for obj in listing.get("Contents", [])), None)


def test_a_paused_writer_whose_lease_was_taken_over_exits_75_without_another_write(s3, tmp_path):
    run = BucketRun(tmp_path, s3)
    old = run.start("old")
    new = None
    try:
        poll_until(lambda: run.folder.exists(Layout.tokenizer.latest), 120, "a checkpoint in the bucket")
        old.send_signal(signal.SIGSTOP)  # a node that lost contact: alive, silent
        new = run.start("new")
        assert new.wait_for('"train.resumed"', timeout=120)
        assert new.events("lease.taken")[0]["reason"] == "expired"
        # Requests it sent before the pause have been answered by now (the server runs here): any
        # change to its log file in the bucket from now on would be a write after the takeover.
        before = log_version(s3)
        old.send_signal(signal.SIGCONT)
        assert old.wait(timeout=60) == 75
        assert old.events("lease.lost")
        assert log_version(s3) == before
        assert lease_doc(run.folder)["pid"] == new.proc.pid
    finally:
        for job in (old, new):
            if job is not None and job.poll() is None:
                job.send_signal(signal.SIGCONT)
                job.send_signal(signal.SIGKILL)
                job.wait(timeout=30)
