"""The uploader's lanes (job.storage.uploader) driven with a fake clock between two real folders on
disk: pacing, order, retries and abandon."""

from __future__ import annotations

import time

import pytest

from job.storage import Layout, LocalFolder
from job.storage.uploader import Lane, Op, Uploader
from tests.helpers import FakeClock, RecordingFolder, poll_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def folders(tmp_path):
    return LocalFolder(tmp_path / "local"), RecordingFolder(tmp_path / "remote")


def put(local: LocalFolder, lane: Lane, rel: str, data: bytes) -> None:
    local.write_bytes(rel, data)
    lane.submit(Op("put", rel))


def test_a_live_file_goes_at_once_then_at_most_once_per_pause(folders):
    local, remote = folders
    clock = FakeClock()
    lane = Lane("live", local, remote, max_wait=1, pause=10, clock=clock)
    try:
        put(local, lane, Layout.progress, b"1")
        poll_until(lambda: remote.read_bytes(Layout.progress) == b"1", 10, "the first send")
        for i in range(2, 6):
            put(local, lane, Layout.progress, str(i).encode())
        # Not due before the pause has passed on the lane's clock, however often it is rewritten.
        assert remote.read_bytes(Layout.progress) == b"1" and lane.backlog() == [Layout.progress]
        clock.now += 10
        lane.submit(Op("put", Layout.progress))  # wakes the lane, which now finds it due
        poll_until(lambda: remote.read_bytes(Layout.progress) == b"5", 10, "the newest content")
        assert remote.written == [Layout.progress, Layout.progress]
        # Someone waiting for a flush does not wait for the pause.
        put(local, lane, Layout.progress, b"6")
        assert lane.wait_idle(time.monotonic() + 10)
        assert remote.read_bytes(Layout.progress) == b"6"
    finally:
        lane.abandon()


def test_the_ordered_lane_keeps_the_order_and_a_resubmitted_file_goes_to_the_back(folders):
    local, remote = folders
    remote.failures_left = 1  # holds the lane on the first file while the rest queue up
    lane = Lane("ordered", local, remote, max_wait=0.05)
    try:
        names = [Layout.checkpoint_file("step-00000001", f) for f in ("model.safetensors", "state.json")]
        manifest = Layout.checkpoint_manifest("step-00000001")
        for rel in (*names, manifest):
            put(local, lane, rel, rel.encode())
        put(local, lane, names[1], b"rewritten")  # now after the manifest
        assert lane.wait_idle(time.monotonic() + 10)
        assert remote.written == [names[0], manifest, names[1]]
        assert remote.read_bytes(names[1]) == b"rewritten"
    finally:
        lane.abandon()


def test_a_failing_store_is_retried_with_backoff_until_it_answers(folders, capsys):
    local, remote = folders
    remote.failures_left = 3
    lane = Lane("ordered", local, remote, max_wait=0.05)
    try:
        put(local, lane, Layout.latest, b"{}")
        assert lane.wait_idle(time.monotonic() + 10)
        assert remote.read_bytes(Layout.latest) == b"{}" and remote.failures_left == 0
    finally:
        lane.abandon()


def test_abandon_ends_retrying_and_leaves_the_backlog(folders):
    local, remote = folders
    remote.failures_left = 10**6
    uploader = Uploader(local, remote, max_wait=0.05)
    local.write_bytes(Layout.latest, b"{}")
    uploader.submit(Op("put", Layout.latest))
    assert uploader.flush(timeout=0.5) == [Layout.latest]
    uploader.abandon()
    poll_until(lambda: not uploader.ordered._thread.is_alive(), 10, "the lane's thread to end")
    assert not remote.exists(Layout.latest)
