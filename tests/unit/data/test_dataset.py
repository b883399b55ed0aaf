"""Reading the dataset (job.data.dataset): hashes checked, a manifest needed, no file names outside
the folder, and disjoint contiguous splits returned in the requested order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from job.config import DataConfig, split_sizes
from job.data.dataset import VideoDataset
from job.data.shards import MANIFEST_NAME, DataError, generate_dataset
from job.data.synthetic import generate_samples

pytestmark = pytest.mark.timeout(60)


def tiny_config(**changes) -> DataConfig:
    values = dict(num_samples=64, frames=4, height=16, width=16, shard_size=16, blob_sigma=0.8)
    return DataConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(tiny_config(), directory)
    return directory


# --- reading --------------------------------------------------------------------------------------


def test_reader_detects_a_flipped_byte(tmp_path, tiny_dataset):
    directory = tmp_path / "copy"
    directory.mkdir()
    for path in tiny_dataset.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    target = directory / "shard-00002.videos.npy"
    payload = bytearray(target.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    target.write_bytes(bytes(payload))

    with pytest.raises(DataError, match=r"shard-00002\.videos\.npy: sha256 does not match"):
        VideoDataset(directory, tiny_config())
    VideoDataset(directory, tiny_config(), verify=False)  # sizes still match: only hashing can tell
    target.write_bytes(bytes(payload[:-1]))
    with pytest.raises(DataError, match=r"shard-00002\.videos\.npy: size"):
        VideoDataset(directory, tiny_config(), verify=False)


def test_reader_needs_a_manifest(tmp_path):
    with pytest.raises(DataError, match=r"no dataset manifest"):
        VideoDataset(tmp_path, tiny_config())


def test_reader_refuses_file_names_outside_the_folder(tmp_path, tiny_dataset):
    manifest = json.loads((tiny_dataset / MANIFEST_NAME).read_text())
    manifest["shards"][0]["files"]["../escape.npy"] = manifest["shards"][0]["files"].popitem()[1]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"not a valid dataset manifest"):
        VideoDataset(tmp_path, tiny_config())


def test_splits_are_disjoint_contiguous_and_cover_everything(tiny_dataset):
    cfg = tiny_config()
    dataset = VideoDataset(tiny_dataset, cfg)
    splits = [dataset.split(name) for name in ("train", "val", "test")]
    assert [len(split) for split in splits] == list(split_sizes(cfg))
    assert np.array_equal(np.concatenate(splits), np.arange(dataset.num_samples))
    assert all(split.dtype == np.int64 for split in splits)
    with pytest.raises(ValueError):
        dataset.split("holdout")


def test_get_returns_the_samples_in_the_requested_order(tiny_dataset):
    cfg = tiny_config()
    dataset = VideoDataset(tiny_dataset, cfg)
    indices = np.array([63, 0, 17, 17, 40, 5, 31, 32])  # unsorted, repeated, across all shards
    videos, labels = dataset.get(indices)
    expected = np.stack([generate_samples(cfg, i, i + 1)[0][0] for i in indices])
    assert videos.dtype == torch.float32 and videos.shape == (8, 1, 4, 16, 16)
    assert labels.dtype == torch.int64 and labels.tolist() == (indices % 4).tolist()
    assert torch.equal(videos, torch.from_numpy(expected).float().div(255.0).unsqueeze(1))
    assert 0.0 <= videos.min() and videos.max() <= 1.0
    with pytest.raises(IndexError):
        dataset.get(np.array([64]))
