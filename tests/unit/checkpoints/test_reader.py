"""The checkpoint reader (job.checkpoints.reader): damaged, unmanifested and old-format checkpoints
are refused, a manifest may name only plain files of its folder, and a checkpoint in a bucket is
deleted manifest first."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from job.checkpoints.format import MANIFEST_FILE, MODEL_FILE
from job.checkpoints.reader import (
    CheckpointError,
    CheckpointReader,
    ManifestMismatch,
    UnreadableCheckpoint,
    delete_checkpoint,
)
from job.runtime.files import atomic_write_bytes
from job.storage import Layout, RunStore
from tests.smoke_parts import fresh_parts, manager, save_at

pytestmark = pytest.mark.timeout(150)


def test_damaged_or_unmanifested_checkpoints_are_refused(tmp_path):
    store = RunStore(str(tmp_path))
    checkpoints = manager(store, fresh_parts(), keep_last=5)
    for step in (1, 2, 3):
        save_at(checkpoints, step)
    weights = tmp_path / Layout.checkpoint_file("step-00000003", MODEL_FILE)
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    atomic_write_bytes(weights, bytes(data))
    os.remove(tmp_path / Layout.checkpoint_file("step-00000002", MANIFEST_FILE))

    reader = CheckpointReader(store)
    with pytest.raises(CheckpointError, match="sha256"):
        reader.load("step-00000003")
    with pytest.raises(CheckpointError, match="manifest"):
        reader.load("step-00000002")
    assert reader.load_newest_valid().name == "step-00000001"


def test_a_checkpoint_of_the_three_file_format_is_refused_naming_its_format(tmp_path):
    """Format 1 kept optimizer, rng and state in three files; its manifest says so, and this job
    does not read it (a resume starts from the newest checkpoint it can read)."""
    store = RunStore(str(tmp_path))
    name = save_at(manager(store, fresh_parts()), 1)
    manifest_path = tmp_path / Layout.checkpoint_manifest(name)
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "format": 1}))
    with pytest.raises(UnreadableCheckpoint, match="checkpoint format 1, this job reads format 2 only"):
        CheckpointReader(store).load(name)


@pytest.mark.parametrize("name", ["../../x", "..", "/etc/passwd", "sub/model.safetensors", ""])
def test_a_manifest_naming_anything_but_a_plain_file_of_its_folder_is_refused(tmp_path, name):
    store = RunStore(str(tmp_path / "run"))
    checkpoint = save_at(manager(store, fresh_parts()), 1)
    outside = tmp_path / "x"
    outside.write_bytes(b"planted")
    manifest_path = tmp_path / "run" / Layout.checkpoint_manifest(checkpoint)
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(b"planted").hexdigest(), "size": 7}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestMismatch, match="not a plain file"):
        CheckpointReader(store).load(checkpoint)
    assert CheckpointReader(store).load_newest_valid() is None


@pytest.mark.timeout(300)
def test_deleting_a_checkpoint_in_the_bucket_removes_its_manifest_first_then_the_rest_at_once(s3, tmp_path):
    store = RunStore(s3.uri("prune"), tmp_path / "cache")
    name = Layout.checkpoint_name(7)
    files = ["model.safetensors", "state.safetensors", "manifest.json"]
    for filename in files:
        store.write_bytes(Layout.checkpoint_file(name, filename), filename.encode())
    store.flush(20)
    calls: list[tuple[str, list[str]]] = []
    sender = store.uploader.ordered.remote  # checkpoints go through the ordered lane's worker
    real_delete, real_delete_many = sender.delete, sender.delete_many
    sender.delete = lambda rel: (calls.append(("delete", [rel])), real_delete(rel))
    sender.delete_many = lambda rels: (calls.append(("delete_many", rels)), real_delete_many(rels))
    delete_checkpoint(store, name)
    store.flush(20)
    store.close()
    assert s3.keys(f"prune/{Layout.checkpoint_dir(name)}") == []
    assert calls[0] == ("delete", [Layout.checkpoint_file(name, "manifest.json")])
    assert calls[1][0] == "delete_many" and len(calls) == 2
    assert sorted(calls[1][1]) == sorted(Layout.checkpoint_file(name, f) for f in files[:-1])
