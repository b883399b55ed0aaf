"""The run folder's storage in process: local folders, the uploader's lanes driven with a fake
clock (pacing, order, retries, abandon) between two real folders on disk, and which answers of a
real S3 server (through a fault-injecting proxy) are refusals for good and which are retried,
and the upload worker processes the lanes send through."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from job.storage import Layout, LocalFolder, RemoteFolder, RunStore, StoreRefused
from job.storage.folders import delete_remote_tree
from job.storage.uploader import Lane, Op, Uploader
from tests.helpers import FAKE_SECRET, REFUSALS, FakeClock, poll_until

pytestmark = pytest.mark.timeout(60)


class RecordingFolder(LocalFolder):
    """A real folder on disk that remembers the order of the writes it received, and can be
    told to fail the next N of them (the store answering 503)."""

    def __init__(self, root):
        super().__init__(root)
        self.written: list[str] = []
        self.failures_left = 0
        self._lock = threading.Lock()

    def write_bytes(self, rel, data):
        with self._lock:
            if self.failures_left:
                self.failures_left -= 1
                raise OSError("503 Service Unavailable (injected)")
            self.written.append(rel)
        super().write_bytes(rel, data)


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


@pytest.mark.parametrize("known", [None, ("manifest.json", "model.safetensors", "state.json")], ids=["listed", "known"])
def test_a_remote_tree_is_deleted_named_files_first_then_the_rest_at_once(tmp_path, known):
    """A folder whose files the caller knows (a checkpoint this process wrote) is not listed."""
    remote = RecordingFolder(tmp_path / "remote")
    folder = Layout.checkpoint_dir("step-00000003")
    for name in ("manifest.json", "model.safetensors", "state.json"):
        remote.write_bytes(f"{folder}/{name}", b"x")
    calls: list[tuple[str, list[str]]] = []
    remote.list_files = lambda rel: (calls.append(("list", [rel])), LocalFolder.list_files(remote, rel))[1]
    remote.delete = lambda rel: (calls.append(("delete", [rel])), LocalFolder.delete(remote, rel))
    remote.delete_many = lambda rels: (calls.append(("delete_many", sorted(rels))), [LocalFolder.delete(remote, r) for r in rels])
    delete_remote_tree(remote, folder, first=("manifest.json",), known=known)
    assert calls == [
        *([("list", [folder])] if known is None else []),
        ("delete", [f"{folder}/manifest.json"]),
        ("delete_many", [f"{folder}/model.safetensors", f"{folder}/state.json"]),
    ]
    assert LocalFolder.list_files(remote, folder) == []


def test_reads_look_in_the_working_copy_then_the_run_uri(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    assert store.read_json(Layout.progress) is None
    store.write_json(Layout.progress, {"step": 3})
    assert store.read_json(Layout.progress) == {"step": 3}
    assert (tmp_path / "run" / Layout.progress).read_text().startswith("{\n")  # the one JSON form
    store.write_bytes(Layout.config, b"not json")
    assert store.read_json(Layout.config) is None
    assert store.list_dir("") == [Layout.config, Layout.progress]


# --- a real S3 server, and a proxy in front of it that answers what a test chooses -------------


def test_the_uploads_are_sent_by_a_worker_process_that_is_replaced_if_killed_and_ends_with_the_store(s3, tmp_path):
    store = RunStore(s3.uri(), tmp_path / "cache")
    try:
        sender = store.uploader.ordered.remote
        assert store.uploader.live.remote is sender  # one process for both lanes, started with the store
        first = sender.pid
        assert first not in (None, os.getpid())
        store.write_json(Layout.latest, {"checkpoint": "step-00000001"})
        store.write_json(Layout.progress, {"status": "running"})
        store.flush(30)
        assert json.loads(s3.get(f"run/{Layout.latest}")) == {"checkpoint": "step-00000001"}
        assert json.loads(s3.get(f"run/{Layout.progress}")) == {"status": "running"}
        os.kill(first, signal.SIGKILL)
        store.write_bytes(Layout.checkpoint_file("step-00000002", "model.safetensors"), b"weights")
        store.flush(30)  # the lane retries; its next request starts a new worker
        assert s3.get(f"run/{Layout.checkpoint_file('step-00000002', 'model.safetensors')}") == b"weights"
        second = sender.pid
        assert second not in (None, first)
    finally:
        store.close()
    assert not Path(f"/proc/{second}").exists(), "the upload worker outlived the store"


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_a_store_refusing_our_credentials_ends_preflight_at_once_naming_the_fix(faulty_store, monkeypatch, s3, tmp_path, code):
    status, message, fix = REFUSALS[code]
    faulty_store.fail_always(status, code, message)
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_store.url)
    store = RunStore(s3.uri(), tmp_path / "cache")
    try:
        with pytest.raises(StoreRefused) as refused:
            store.preflight(connect_seconds=300)
    finally:
        store.close()
    assert code in str(refused.value) and fix in str(refused.value)
    assert faulty_store.requests == 1  # not retried: its answer will not change
    assert FAKE_SECRET not in str(refused.value)


def test_a_missing_bucket_is_a_refusal_not_an_empty_run(s3, tmp_path):
    folder = RemoteFolder(f"s3://{s3.name}-missing/run")
    for read in (lambda: folder.read_bytes(Layout.progress), lambda: folder.list_dir(Layout.checkpoints)):
        with pytest.raises(StoreRefused, match=f"bucket {s3.name}-missing does not exist"):
            read()
    present = RemoteFolder(s3.uri())
    assert present.read_bytes(Layout.progress) is None and present.list_dir(Layout.checkpoints) == []  # a missing key is an answer


@pytest.mark.parametrize("status, code", [(503, "SlowDown"), (500, "InternalError")])
def test_a_busy_store_is_retried_and_the_preflight_passes(faulty_store, monkeypatch, s3, tmp_path, status, code):
    # More busy answers than botocore's own single retry absorbs: the preflight's retry is needed.
    faulty_store.fail_next(3, status, code, "Please try again.")
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_store.url)
    store = RunStore(s3.uri(), tmp_path / "cache")
    try:
        store.preflight(connect_seconds=60)
    finally:
        store.close()
    assert not faulty_store.faults  # all were answered, then the probe went through
