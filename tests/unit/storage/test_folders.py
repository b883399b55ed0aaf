"""Run folders (job.storage.folders): a remote tree is deleted named files first, then the rest at
once."""

from __future__ import annotations

import pytest

from job.storage import Layout, LocalFolder
from job.storage.folders import delete_remote_tree
from tests.helpers import RecordingFolder

pytestmark = pytest.mark.timeout(60)


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
