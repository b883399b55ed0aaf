"""The uploader's lanes (job.storage.uploader) driven with a fake clock between two real folders on
disk: pacing, order, retries and abandon."""

from __future__ import annotations

import time

import pytest

from job.storage import Layout, LocalFolder
from job.storage.uploader import AT_ONCE, Lane, Op, Uploader, commits
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
    poll_until(lambda: not any(t.is_alive() for t in uploader.ordered._threads), 10, "the lane's thread to end")
    assert not remote.exists(Layout.latest)


def test_the_ordered_lane_sends_a_checkpoints_files_together_then_its_manifest_then_latest(folders):
    local, remote = folders
    remote.seconds = 0.3  # a slow store: each write takes a while
    lane = Lane("ordered", local, remote, max_wait=0.05, commits=commits, at_once=AT_ONCE)
    try:
        files = [Layout.checkpoint_file("step-00000001", f) for f in ("model.safetensors", "state.safetensors")]
        manifest = Layout.checkpoint_manifest("step-00000001")
        for rel in (*files, manifest, Layout.latest):
            put(local, lane, rel, rel.encode())
        assert lane.wait_idle(time.monotonic() + 10)
    finally:
        lane.abandon()
    assert remote.most_at_once == 2  # the two data files together; the manifest and latest.json alone
    assert sorted(remote.finished[:2]) == files and remote.finished[2:] == [manifest, Layout.latest]
    assert remote.written[2:] == [manifest, Layout.latest]  # each started after all before it arrived


def test_a_checkpoint_pruned_before_it_was_sent_is_never_sent(folders):
    local, remote = folders
    remote.gate.clear()  # the store holds the first requests: the checkpoints queue up behind them
    lane = Lane("ordered", local, remote, max_wait=0.05, commits=commits, at_once=AT_ONCE)
    try:
        older, newer = "step-00000001", "step-00000002"
        put(local, lane, Layout.data_manifest, b"{}")  # in flight, and a commit: the rest waits
        for name in (older, newer):
            for f in ("model.safetensors", "manifest.json"):
                put(local, lane, Layout.checkpoint_file(name, f), f.encode())
            put(local, lane, Layout.latest, name.encode())
        local.delete_tree(Layout.checkpoint_dir(older))
        lane.submit(Op("delete_tree", Layout.checkpoint_dir(older), ("manifest.json",), ("model.safetensors", "manifest.json")))
        remote.gate.set()
        assert lane.wait_idle(time.monotonic() + 10)
    finally:
        lane.abandon()
    assert remote.written == [Layout.data_manifest, *(Layout.checkpoint_file(newer, f) for f in ("model.safetensors", "manifest.json")),
                              Layout.latest]
    assert remote.read_bytes(Layout.latest) == newer.encode()
