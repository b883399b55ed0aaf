"""The run store (job.storage.store): reads look in the working copy then the run URI, a missing
bucket is a refusal, and live files are sent once per pause (a real moto server on 127.0.0.1)."""

from __future__ import annotations

import json
import time

import pytest

from job.storage import Layout, RemoteFolder, RunStore, StoreRefused
from tests.helpers import record_sends

pytestmark = pytest.mark.timeout(60)


@pytest.mark.timeout(300)
def test_live_files_rewritten_many_times_are_sent_once_per_pause_and_checkpoints_are_not_held(s3, tmp_path):
    store = RunStore(s3.uri("live"), tmp_path / "cache", live_upload_seconds=60)
    sent = record_sends(store)
    for i in range(20):
        store.write_json(Layout.progress, {"step": i})
        time.sleep(0.01)
    checkpoint_file = Layout.checkpoint_file(Layout.checkpoint_name(1), "model.safetensors")
    store.write_bytes(checkpoint_file, b"weights")
    deadline = time.monotonic() + 20  # far less than the live lane's 60 s pause
    while f"live/{checkpoint_file}" not in s3.keys("live/") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"live/{checkpoint_file}" in s3.keys("live/"), "a checkpoint waited for the live lane's pause"
    store.flush(20)  # a flush does not wait out the pause
    store.close()
    assert json.loads(s3.get("live/progress.json")) == {"step": 19}
    assert sent.count(Layout.progress) <= 2, sent


def test_reads_look_in_the_working_copy_then_the_run_uri(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    assert store.read_json(Layout.progress) is None
    store.write_json(Layout.progress, {"step": 3})
    assert store.read_json(Layout.progress) == {"step": 3}
    assert (tmp_path / "run" / Layout.progress).read_text().startswith("{\n")  # the one JSON form
    store.write_bytes(Layout.config, b"not json")
    assert store.read_json(Layout.config) is None
    assert store.list_dir("") == [Layout.config, Layout.progress]


def test_a_missing_bucket_is_a_refusal_not_an_empty_run(s3, tmp_path):
    folder = RemoteFolder(f"s3://{s3.name}-missing/run")
    for read in (lambda: folder.read_bytes(Layout.progress), lambda: folder.list_dir(Layout.checkpoints)):
        with pytest.raises(StoreRefused, match=f"bucket {s3.name}-missing does not exist"):
            read()
    present = RemoteFolder(s3.uri())
    assert present.read_bytes(Layout.progress) is None and present.list_dir(Layout.checkpoints) == []  # a missing key is an answer


def test_proven_reads_answer_what_the_bucket_holds_and_use_the_cache_only_where_its_checksum_proves_it(
    faulty_store, monkeypatch, s3, tmp_path,
):
    weights, manifest = Layout.checkpoint_file("step-00000001", "model.safetensors"), Layout.checkpoint_manifest("step-00000001")
    writer = RunStore(s3.uri(), tmp_path / "cache")
    writer.write_bytes(weights, b"good weights")
    writer.write_json(manifest, {"files": {}})
    writer.flush(30)
    writer.close()
    s3.put(f"run/{weights}", b"rotten weigh")  # the same size: only the bytes differ
    writer.local.write_bytes(Layout.progress, b"{}")  # in the cache alone (never uploaded)

    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_store.url)  # to count the requests
    store = RunStore(s3.uri(), tmp_path / "cache", proven_reads=True, read_only=True)
    assert store.read_bytes(weights) == b"rotten weigh"
    assert store.read_json(manifest) == {"files": {}}
    assert store.read_bytes(Layout.progress) is None and not store.exists(Layout.progress)
    assert store.list_dir("") == ["checkpoints"] and store.exists("checkpoints/step-00000001")
    assert faulty_store.requests == 2  # one listing, then the one object the cache could not stand for


def test_after_its_snapshot_a_writer_asks_the_run_uri_only_for_the_content_of_files_it_lists(
    faulty_store, monkeypatch, s3, tmp_path,
):
    weights = Layout.checkpoint_file("step-00000001", "model.safetensors")
    s3.put(f"run/{weights}", b"weights")
    s3.put(f"run/{Layout.progress}", b'{"attempt": 1}')
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_store.url)  # to count the requests
    store = RunStore(s3.uri(), tmp_path / "cache")
    try:
        store.local.write_bytes(Layout.config, b"{}")  # this writer's own (local first)
        assert set(store.snapshot()) == {weights, Layout.progress}
        listed = faulty_store.requests
        assert store.list_dir("") == sorted(["checkpoints", Layout.config, Layout.progress])
        assert store.exists(Layout.checkpoint_dir("step-00000001")) and not store.exists(Layout.latest)
        assert store.read_bytes(Layout.latest) is None and store.read_json(Layout.config) == {}
        assert store.file_sizes(Layout.checkpoint_dir("step-00000001")) == {"model.safetensors": 7}
        assert faulty_store.requests == listed  # all of it answered from the listing and the cache
        assert store.read_json(Layout.progress) == {"attempt": 1} and faulty_store.requests == listed + 1
        store.delete_tree(Layout.checkpoint_dir("step-00000001"))
        assert store.list_dir(Layout.checkpoints) == []
    finally:
        store.close()
