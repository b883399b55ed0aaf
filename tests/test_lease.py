"""One writer per run (SPEC §10): the lease in the run folder, in process against a local folder
and a real S3 endpoint (moto, which enforces If-Match / If-None-Match) with fake clocks; then
`train` processes on one run: a second one is refused and writes nothing, a kill -9 restart
resumes at once, and a paused writer whose lease was taken over exits without another write."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from job.monitoring.watchdog import LeaseKeeper
from job.storage import Layout, LocalFolder, RemoteFolder, RunStore
from job.storage.folders import WriteConflict
from job.storage.lease import Lease, LeaseBusy, LeaseLapsed, LeaseLost, Machine
from job.storage.uploader import Lane, Op
from tests.helpers import (
    TOKENIZER_ONLY,
    FakeClock,
    JobProcess,
    assert_workers_end,
    poll_until,
    run_job,
    worker_processes,
)

UPLOAD_WORKER = "job.storage.upload_worker"

pytestmark = pytest.mark.timeout(120)
TTL = 6.0


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return LocalFolder(tmp_path / "run")
    return RemoteFolder(request.getfixturevalue("s3").uri())


def elsewhere() -> Machine:
    """A process on another machine: nothing about it can be checked from here."""
    machine = Machine()
    machine.host, machine.boot_id = "other-host", "another-boot"
    return machine


def gone() -> Machine:
    """A process of this machine that has ended (its pid is free)."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    machine = Machine()
    machine.pid = int(ended.stdout)
    return machine


def lease_doc(folder) -> dict:
    return json.loads(folder.read_bytes(Layout.lease))


def test_conditional_writes_create_only_when_absent_and_replace_only_what_was_read(folder):
    tag = folder.write_if(Layout.lease, b"first", None)
    with pytest.raises(WriteConflict):
        folder.write_if(Layout.lease, b"second", None)  # If-None-Match: * on an existing file
    assert folder.read_tagged(Layout.lease) == (b"first", tag)
    newer = folder.write_if(Layout.lease, b"second", tag)
    with pytest.raises(WriteConflict):
        folder.write_if(Layout.lease, b"third", tag)  # If-Match with a stale tag
    assert folder.read_tagged(Layout.lease) == (b"second", newer)


def test_a_second_writer_waits_for_a_live_holder_then_gives_up_naming_it(folder):
    clock = FakeClock()
    holder = Lease(folder, TTL, clock=clock, machine=elsewhere())
    holder.acquire(wait_seconds=0)

    def sleep_while_the_holder_renews(seconds):
        clock.now += seconds
        holder.renew()

    second = Lease(folder, TTL, clock=clock, sleep=sleep_while_the_holder_renews)
    with pytest.raises(LeaseBusy, match="another writer holds this run: attempt None on host other-host"):
        second.acquire(wait_seconds=2 * TTL)
    assert lease_doc(folder)["holder"] == holder.holder
    holder.check()  # still the writer


def test_an_expired_lease_is_taken_over_and_its_old_holder_may_write_nothing_more(folder, tmp_path):
    clock = FakeClock()
    old = Lease(folder, TTL, clock=clock, machine=elsewhere())
    old.acquire(wait_seconds=0)  # then never renewed: a host that lost contact

    def sleep(seconds):
        clock.now += seconds

    started = clock.now
    new = Lease(folder, TTL, clock=clock, sleep=sleep)
    assert new.acquire(wait_seconds=2 * TTL) == "expired"
    assert clock.now - started >= TTL  # a whole TTL of the taker's own clock, no host's wall time
    assert lease_doc(folder)["holder"] == new.holder

    with pytest.raises(LeaseLapsed):  # its own deadline passed long ago
        old.check()
    with pytest.raises(LeaseLost, match="taken over by"):
        old.renew()  # If-Match on the tag it last wrote: refused
    store = RunStore(str(tmp_path / "old-writer"))
    store.lease = old
    with pytest.raises(LeaseLost):
        store.write_json(Layout.tokenizer.latest, {"checkpoint": "step-00000005", "step": 5})
    assert not store.local.exists(Layout.tokenizer.latest)


def test_a_lapsed_lease_holds_writes_back_and_a_renewal_nobody_raced_revives_it(folder):
    clock = FakeClock()
    lease = Lease(folder, TTL, clock=clock)
    lease.acquire(wait_seconds=0)
    clock.now += TTL * 0.75  # no renewal got through (the store was away)
    with pytest.raises(LeaseLapsed):
        lease.check()
    lease.renew()  # nobody wrote the lease meanwhile: the same holder goes on
    lease.check()


def test_a_holder_process_gone_on_this_machine_is_taken_over_at_once(folder):
    dead = gone()
    Lease(folder, TTL, machine=dead).acquire(wait_seconds=0)
    assert Lease(folder, TTL).acquire(wait_seconds=0) == "holder process gone"


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


def test_a_holder_process_alive_on_this_machine_is_waited_for(folder):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = Machine()
        alive.pid = sleeper.pid
        Lease(folder, TTL, machine=alive).acquire(wait_seconds=0)
        with pytest.raises(LeaseBusy):
            Lease(folder, TTL).acquire(wait_seconds=0)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_released_lease_is_taken_at_once(folder):
    first = Lease(folder, TTL, machine=elsewhere())
    first.acquire(wait_seconds=0)
    first.release()
    assert lease_doc(folder)["released_at"]
    assert Lease(folder, TTL).acquire(wait_seconds=0) == "released"
    with pytest.raises(LeaseLost):
        first.check()


def test_the_keeper_ends_a_writer_whose_lease_was_taken_with_exit_75(folder):
    clock = FakeClock()
    old = Lease(folder, TTL, clock=clock, machine=elsewhere())
    old.acquire(wait_seconds=0)

    def sleep(seconds):
        clock.now += seconds

    Lease(folder, TTL, clock=clock, sleep=sleep).acquire(wait_seconds=2 * TTL)
    exits = []
    LeaseKeeper(old, exit=exits.append).tick()
    assert exits == [75]


def test_an_upload_lane_of_a_writer_that_lost_its_lease_sends_nothing(tmp_path):
    local, remote = LocalFolder(tmp_path / "cache"), LocalFolder(tmp_path / "run")
    local.write_bytes(Layout.tokenizer.latest, b"{}")

    def lost():
        raise LeaseLost("taken over (test)")

    lane = Lane("ordered", local, remote, max_wait=0.1, guard=lost)
    lane.submit(Op("put", Layout.tokenizer.latest))
    assert not lane.wait_idle(deadline=time.monotonic() + 0.5)  # abandoned, not retried
    assert not remote.exists(Layout.tokenizer.latest)


def test_status_shows_who_holds_the_run_and_whether_it_still_does(tmp_path):
    from job.modes.status import read_run, report_json

    folder = LocalFolder(tmp_path / "run")
    folder.write_bytes(Layout.progress, json.dumps({"status": "running", "attempt": 3}).encode())
    lease = Lease(folder, TTL)
    lease.attempt = 3
    lease.acquire(wait_seconds=0)
    writer = report_json(read_run(str(folder.root)))["writer"]
    assert (writer["attempt"], writer["pid"], writer["state"]) == (3, lease.machine.pid, "holding")
    lease.release()
    assert report_json(read_run(str(folder.root)))["writer"]["state"] == "released"


def test_a_cache_left_by_a_writer_that_lost_the_run_never_turns_the_bucket_back(s3, tmp_path):
    """Its checkpoints older than the bucket's latest are what the new writer pruned there."""
    from job.checkpoints.manager import mirror_unsent

    stage = Layout.tokenizer
    s3.put(f"run/{stage.latest}", json.dumps({"checkpoint": "step-00000010", "step": 10}).encode())
    store = RunStore(s3.uri(), cache_dir=tmp_path / "cache")
    for name in ("step-00000005", "step-00000015"):  # older and newer than the bucket's latest
        store.local.write_bytes(stage.checkpoint_file(name, "model.safetensors"), name.encode())
        store.local.write_bytes(stage.checkpoint_manifest(name), json.dumps({"files": {"model.safetensors": {}}}).encode())
    store.local.write_bytes(stage.latest, json.dumps({"checkpoint": "step-00000015", "step": 15}).encode())
    mirror_unsent(store, stage)
    store.flush(30)
    store.close()
    assert [k for k in s3.keys("run/checkpoints/") if "step-" in k] == [
        "run/checkpoints/step-00000015/manifest.json", "run/checkpoints/step-00000015/model.safetensors",
    ]
    assert json.loads(s3.get(f"run/{stage.latest}"))["checkpoint"] == "step-00000015"


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


@pytest.mark.slow
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


@pytest.mark.slow
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
