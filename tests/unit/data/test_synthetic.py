"""The synthetic videos (job.data.synthetic, SPEC §5): a pure function of seed and index, shapes
and range, balanced classes that look different, mostly black frames that show the object."""

from __future__ import annotations

import numpy as np
import pytest

from job.config import TRAJECTORY_CLASSES, DataConfig
from job.data.shards import VISIBLE_PIXEL, validate_samples
from job.data.synthetic import generate_samples

pytestmark = pytest.mark.timeout(60)


def tiny_config(**changes) -> DataConfig:
    values = dict(num_samples=64, frames=4, height=16, width=16, shard_size=16, blob_sigma=0.8)
    return DataConfig(**{**values, **changes})


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
