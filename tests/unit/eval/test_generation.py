"""Stage 2's generation metrics (job.eval.generation) on crafted videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from job.eval.generation import diversity, presence, second_difference

pytestmark = pytest.mark.timeout(600)
THRESHOLD = 0.05


def blob_videos(positions: np.ndarray, size: int = 16, sigma: float = 0.8) -> torch.Tensor:
    """Gaussian blobs at ``positions`` (N, T, 2) (row, col): frames (N, T, size, size)."""
    rows = torch.arange(size, dtype=torch.float32)[:, None]
    cols = torch.arange(size, dtype=torch.float32)[None, :]
    p = torch.as_tensor(positions, dtype=torch.float32)
    squared = (rows - p[..., 0, None, None]) ** 2 + (cols - p[..., 1, None, None]) ** 2
    return torch.exp(-squared / (2 * sigma**2))


def linear_blobs(n: int = 3, frames: int = 6) -> torch.Tensor:
    start = np.array([[4.0, 3.0], [5.0, 5.0], [3.0, 6.0]])[:n]
    velocity = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])[:n]
    t = np.arange(frames)[None, :, None]
    return blob_videos(start[:, None] + t * velocity[:, None])


# --- generation metrics --------------------------------------------------------------------------


def test_generation_metrics_on_crafted_videos():
    videos = linear_blobs()
    assert presence(videos) == 1.0
    dim = videos.clone()
    dim[:, ::2] *= 50 / 255  # every other frame's brightest pixel is 50 < VISIBLE_PIXEL
    assert presence(dim) == pytest.approx(0.5)
    assert second_difference(videos, THRESHOLD) == pytest.approx(0.0, abs=1e-4)
    bent = blob_videos(np.array([[[4, 4], [5, 5], [6, 6], [6, 8], [6, 10], [6, 12]]], dtype=float))
    assert second_difference(bent, THRESHOLD) == pytest.approx(2**0.5 / 4, abs=1e-3)  # one bend of |(-1, 1)| in 4
    assert diversity(videos[:1].repeat(3, 1, 1, 1)) == 0.0
    assert diversity(videos) > 0.0
