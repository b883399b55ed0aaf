"""The dataset's shards (job.data.shards, SPEC §5): validation, shards then manifest with hashes,
resume and repair of damaged shards, and another data config refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from job.config import DataConfig
from job.data.dataset import VideoDataset
from job.data.shards import MANIFEST_NAME, DataError, generate_dataset, validate_samples
from job.data.synthetic import generate_samples
from job.runtime.files import sha256_file

pytestmark = pytest.mark.timeout(60)


def tiny_config(**changes) -> DataConfig:
    values = dict(num_samples=64, frames=4, height=16, width=16, shard_size=16, blob_sigma=0.8)
    return DataConfig(**{**values, **changes})


def shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("shard-*.npy"))


def test_the_default_dataset_passes_validation():
    cfg = DataConfig()
    for start in range(0, cfg.num_samples, cfg.shard_size):
        videos, labels = generate_samples(cfg, start, start + cfg.shard_size)
        validate_samples(videos, labels, start, cfg)


# --- validation -----------------------------------------------------------------------------------


def test_validation_names_a_sample_without_object():
    cfg = tiny_config()
    videos, labels = generate_samples(cfg, 100, 108)
    videos[5, 1:] = 0  # the object vanishes after the first frame
    with pytest.raises(DataError, match=r"sample 105: object visible in only 1 of 4 frames"):
        validate_samples(videos, labels, 100, cfg)


def test_validation_names_a_bad_label_and_unbalanced_classes():
    cfg = tiny_config()
    videos, labels = generate_samples(cfg, 0, 8)
    wrong = labels.copy()
    wrong[6] = len(cfg.classes)
    with pytest.raises(DataError, match=r"sample 6: label 4 outside 0\.\.3"):
        validate_samples(videos, wrong, 0, cfg)
    with pytest.raises(DataError, match=r"classes unbalanced"):
        validate_samples(videos, np.zeros_like(labels), 0, cfg)


def test_validation_names_non_finite_or_out_of_range_pixels():
    cfg = tiny_config()
    videos, labels = generate_samples(cfg, 0, 8)
    as_float = videos / 255.0
    as_float[2, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"sample 2: not finite"):
        validate_samples(as_float, labels, 0, cfg)
    as_float[2, 0, 0, 0] = 1.5
    with pytest.raises(DataError, match=r"sample 2: pixels outside \[0, 1\]"):
        validate_samples(as_float, labels, 0, cfg)
    as_float[2, 0, 0, 0] = 0.0
    with pytest.raises(DataError, match=r"dtype float64, expected uint8"):
        validate_samples(as_float, labels, 0, cfg)
    too_bright = videos.astype(np.int16)
    too_bright[3] += 300
    with pytest.raises(DataError, match=r"sample 3: pixels outside 0\.\.255"):
        validate_samples(too_bright, labels, 0, cfg)
    with pytest.raises(DataError, match=r"shape"):
        validate_samples(videos[:, :2], labels, 0, cfg)


# --- shards on disk ----------------------------------------------------------------------------


def test_generate_writes_shards_then_manifest_with_hashes(tmp_path):
    cfg = tiny_config()
    calls = []
    manifest = generate_dataset(cfg, tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(16, 64), (32, 64), (48, 64), (64, 64)]
    on_disk = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    assert manifest["num_samples"] == 64 and manifest["shape"] == [4, 16, 16]
    assert manifest["classes"] == list(cfg.classes) and "uri" not in manifest["data_config"]
    assert not (tmp_path / ".partial.json").exists()
    newest_shard = max(path.stat().st_mtime_ns for path in shard_paths(tmp_path))
    assert (tmp_path / MANIFEST_NAME).stat().st_mtime_ns >= newest_shard
    for shard in manifest["shards"]:
        for name, record in shard["files"].items():
            assert sha256_file(tmp_path / name) == record["sha256"]
            assert (tmp_path / name).stat().st_size == record["size"]
    videos = np.load(tmp_path / "shard-00002.videos.npy", allow_pickle=False)
    assert videos.tobytes() == generate_samples(cfg, 32, 48)[0].tobytes()


def test_complete_dataset_is_returned_without_work(tmp_path):
    cfg = tiny_config()
    first = generate_dataset(cfg, tmp_path)
    inodes = {path.name: path.stat().st_ino for path in tmp_path.iterdir()}
    calls = []
    assert generate_dataset(cfg, tmp_path, progress=lambda *_: calls.append(1)) == first
    assert calls == [] and inodes == {path.name: path.stat().st_ino for path in tmp_path.iterdir()}


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_resume_rewrites_only_the_damaged_shard(tmp_path, damage):
    cfg = tiny_config()
    reference = generate_dataset(cfg, tmp_path / "fresh")
    directory = tmp_path / "resumed"
    generate_dataset(cfg, directory)
    # An interrupted generation: shards on disk, progress file kept, no manifest yet.
    (directory / ".partial.json").write_text(json.dumps({"data_config": reference["data_config"],
                                                         "shards": reference["shards"][:3]}))
    (directory / MANIFEST_NAME).unlink()
    damaged = directory / "shard-00001.videos.npy"
    if damage == "delete":
        damaged.unlink()
    else:
        payload = bytearray(damaged.read_bytes())
        payload[-1] ^= 0xFF
        damaged.write_bytes(bytes(payload))
    inodes = {path.name: path.stat().st_ino for path in shard_paths(directory)}

    manifest = generate_dataset(cfg, directory)

    rewritten = {path.name for path in shard_paths(directory) if inodes.get(path.name) != path.stat().st_ino}
    # shard 1 was damaged; shard 3 was not in the progress file, so it cannot be trusted
    assert rewritten == {"shard-00001.videos.npy", "shard-00001.labels.npy",
                         "shard-00003.videos.npy", "shard-00003.labels.npy"}
    assert manifest == reference
    for path in shard_paths(directory):
        assert path.read_bytes() == (tmp_path / "fresh" / path.name).read_bytes()


def test_a_damaged_complete_dataset_is_repaired(tmp_path):
    cfg = tiny_config()
    reference = generate_dataset(cfg, tmp_path)
    (tmp_path / "shard-00002.labels.npy").unlink()
    assert generate_dataset(cfg, tmp_path) == reference
    VideoDataset(tmp_path, cfg)


def test_other_data_config_is_refused_naming_the_key(tmp_path):
    generate_dataset(tiny_config(), tmp_path)
    with pytest.raises(DataError, match=r"differs in noise_std_max, seed"):
        generate_dataset(tiny_config(seed=5, noise_std_max=0.01), tmp_path)
    with pytest.raises(DataError, match=r"differs in seed"):
        VideoDataset(tmp_path, tiny_config(seed=5))
    VideoDataset(tmp_path, tiny_config(uri="s3://elsewhere/data"))  # where the data lives is not the data
