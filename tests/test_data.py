"""The synthetic dataset (SPEC §5): purity, rendering, validation, shards, resume and reading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from job.config import TRAJECTORY_CLASSES, DataConfig, split_sizes
from job.data.dataset import VideoDataset
from job.data.shards import MANIFEST_NAME, VISIBLE_PIXEL, DataError, generate_dataset, validate_samples
from job.data.synthetic import generate_samples
from job.runtime.files import sha256_file

pytestmark = pytest.mark.timeout(60)


def tiny_config(**changes) -> DataConfig:
    values = dict(num_samples=64, frames=4, height=16, width=16, shard_size=16, blob_sigma=0.8)
    return DataConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(tiny_config(), directory)
    return directory


def shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("shard-*.npy"))


# --- samples ------------------------------------------------------------------------------------


def test_sample_is_a_pure_function_of_seed_and_index():
    cfg = tiny_config(num_samples=100)
    whole, whole_labels = generate_samples(cfg, 0, 100)
    part, part_labels = generate_samples(cfg, 37, 60)
    assert part.tobytes() == whole[37:60].tobytes()
    assert np.array_equal(part_labels, whole_labels[37:60])
    single, _ = generate_samples(cfg, 99, 100)
    assert single.tobytes() == whole[99:].tobytes()

    other_seed, other_labels = generate_samples(tiny_config(seed=1), 0, 100)
    assert np.array_equal(other_labels, whole_labels)
    assert (other_seed != whole).any(axis=(1, 2, 3)).all()  # every sample changes with the seed


def test_shapes_dtypes_and_range_at_default_size():
    cfg = DataConfig()
    videos, labels = generate_samples(cfg, 0, 8)
    assert videos.shape == (8, 16, 64, 64) and videos.dtype == np.uint8
    assert labels.shape == (8,) and labels.dtype == np.int64
    assert videos.max() == 255  # a blob centred on a pixel reaches full intensity
    validate_samples(videos, labels, 0, cfg)


def test_classes_are_balanced_and_at_least_four():
    assert {"linear", "circular", "helical", "parabolic"} <= set(TRAJECTORY_CLASSES)
    cfg = tiny_config(classes=TRAJECTORY_CLASSES)
    _, labels = generate_samples(cfg, 3, 3 + 10 * len(TRAJECTORY_CLASSES))
    assert np.bincount(labels).tolist() == [10] * len(TRAJECTORY_CLASSES)
    assert labels[0] == 3 % len(TRAJECTORY_CLASSES)


def test_frames_are_mostly_black_and_show_the_object():
    videos, _ = generate_samples(DataConfig(), 0, 40)
    assert (videos == 0).mean(axis=(2, 3)).min() > 0.95
    assert (videos.max(axis=(2, 3)) >= VISIBLE_PIXEL).mean() > 0.95


def test_classes_look_different():
    """The blob's centroid track separates the classes: its two principal spreads are equal
    for a circle, one is zero for a line, and a parabola's arc lies between."""
    cfg = DataConfig(frames=16, height=32, width=32, blob_sigma=1.0)
    videos, labels = generate_samples(cfg, 0, 400)
    weights = videos.astype(np.float64)
    grid = np.arange(32.0)
    cols = (weights.sum(axis=2) * grid).sum(axis=2) / weights.sum(axis=(2, 3))
    rows = (weights.sum(axis=3) * grid).sum(axis=2) / weights.sum(axis=(2, 3))
    track = np.stack([cols, rows], axis=-1)
    centred = track - track.mean(axis=1, keepdims=True)
    singular = np.linalg.svd(centred, compute_uv=False)
    straightness = singular[:, 1] / singular[:, 0]  # ~0 for a line, ~1 for a circle
    by_class = {name: np.median(straightness[labels == k]) for k, name in enumerate(cfg.classes)}
    assert by_class["linear"] < 0.05
    assert by_class["circular"] > 0.6
    assert by_class["parabolic"] < by_class["circular"]


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
