"""The run folder's storage against processes and a faulty store: the upload worker process the
lanes send through (replaced if killed, ended with the store), and which answers of a real S3
server (through a fault-injecting proxy) are refusals for good and which are retried."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from job.storage import Layout, RunStore, StoreRefused
from tests.helpers import FAKE_SECRET, REFUSALS

pytestmark = pytest.mark.timeout(60)


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
    store = RunStore(s3.uri(), tmp_path / "cache", connect_seconds=300)
    try:
        with pytest.raises(StoreRefused) as refused:
            store.preflight()
    finally:
        store.close()
    assert code in str(refused.value) and fix in str(refused.value)
    assert faulty_store.requests == 1  # not retried: its answer will not change
    assert FAKE_SECRET not in str(refused.value)


@pytest.mark.parametrize("status, code", [(503, "SlowDown"), (500, "InternalError")])
def test_a_busy_store_is_retried_and_the_preflight_passes(faulty_store, monkeypatch, s3, tmp_path, status, code):
    # More busy answers than botocore's own single retry absorbs: the preflight's retry is needed.
    faulty_store.fail_next(3, status, code, "Please try again.")
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_store.url)
    store = RunStore(s3.uri(), tmp_path / "cache", connect_seconds=60)
    try:
        store.preflight()
    finally:
        store.close()
    assert not faulty_store.faults  # all were answered, then the probe went through
