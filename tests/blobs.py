"""Crafted videos of Gaussian blobs on known paths, for the generation and prediction tests."""

from __future__ import annotations

import numpy as np
import torch


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
