"""One writer per run (job.storage.lease, SPEC §10): the lease in the run folder, in process against
a local folder and a real S3 endpoint (moto, which enforces If-Match / If-None-Match) with fake
clocks, and what a writer that lost its lease may still do."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import structlog

from job.monitoring.watchdog import LeaseKeeper
from job.storage import Layout, LocalFolder, RemoteFolder, RunStore
from job.storage.folders import WriteConflict
from job.storage.lease import Lease, LeaseBusy, LeaseLapsed, LeaseLost, Machine
from job.storage.patience import Patience
from job.storage.uploader import Lane, Op
from tests.helpers import FakeClock, gone, lease_doc, poll_until

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


def test_taking_the_lease_rides_out_a_store_away_and_a_failed_note_of_the_attempt_is_only_a_lapse(
    s3, faulty_store, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_store.url)
    folder = RemoteFolder(s3.uri())
    away = faulty_store.cut_for(2)
    lease = Lease(folder, TTL, patience=Patience(folder.uri, 30))
    assert lease.acquire(wait_seconds=0) == "no lease"
    assert away.cut  # it was asked while the store was away, and waited for it

    away = faulty_store.cut_for(1)
    with structlog.testing.capture_logs() as logs:
        lease.note_attempt(3)  # the start goes on: the keeper's next renewal carries the number
    assert [e["event"] for e in logs] == ["lease.renew_failed"] and away.cut
    poll_until(lambda: not away.covers(time.monotonic()), 10, "the store to come back")
    lease.renew()
    assert lease_doc(folder)["attempt"] == 3


class SlowFolder(LocalFolder):
    """A folder whose conditional writes take ``seconds`` of a fake clock (a distant or slow store)."""

    def __init__(self, root, clock: FakeClock, seconds: float):
        super().__init__(root)
        self.clock, self.seconds = clock, seconds

    def write_if(self, rel, data, etag):
        self.clock.now += self.seconds
        return super().write_if(rel, data, etag)


def test_a_slow_stores_round_trip_brings_the_holders_deadline_forward_and_is_warned_of_once(tmp_path):
    from structlog.testing import capture_logs

    clock = FakeClock()
    folder = SlowFolder(tmp_path / "run", clock, seconds=0.5)
    lease = Lease(folder, TTL, clock=clock)
    with capture_logs() as logs:
        lease.acquire(wait_seconds=0)  # sent at 1000, answered at 1000.5
        assert lease.round_trip == 0.5 and lease.renew_in() == pytest.approx(TTL / 4 - 0.5)  # a quarter TTL after sending
        clock.now += TTL * 0.75 - 1.0 - 0.01  # a write let through now lands by three quarters of the TTL
        lease.check()
        clock.now += 0.02
        with pytest.raises(LeaseLapsed):
            lease.check()
        assert not [e for e in logs if e["event"] == "lease.slow_store"]
        folder.seconds = TTL / 4 + 0.5  # a round trip over a quarter of the lease
        lease.renew()
        lease.renew()
    (warning,) = [e for e in logs if e["event"] == "lease.slow_store"]
    assert warning["setting"] == "storage.lease_seconds" and warning["round_trip_seconds"] == TTL / 4 + 0.5
