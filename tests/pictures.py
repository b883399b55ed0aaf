"""Crafted pictures and metrics for the plot tests (unit and drills)."""

from __future__ import annotations

import math
from io import BytesIO

import numpy as np
from matplotlib.image import imread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decoded(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_SIGNATURE)
    image = imread(BytesIO(png), format="png")
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].var() > 0, "blank image"
    return image


def epoch_record(epoch: int) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 0.3 * math.exp(-epoch / 4) - 0.05,  # negative late on, like the LFQ entropy term makes it
        "val_loss": 0.2 * math.exp(-epoch / 4) + 0.01,
        "val_mse": 0.05 * math.exp(-epoch / 4) + 0.001,
        "lr": 1e-3 * min(1.0, epoch / 3),
        "codebook_usage": min(1.0, 0.1 * epoch),
        "codebook_perplexity": 20.0 * epoch,
    }


def blob_videos(n_samples: int, frames: int = 6, size: int = 16) -> np.ndarray:
    """Dark clips with one bright pixel moving along the diagonal, like a tiny blob."""
    videos = np.zeros((n_samples, frames, size, size), dtype=np.float32)
    for t in range(frames):
        position = t * (size - 1) // max(1, frames - 1)
        videos[:, t, position, position] = 1.0
    return videos
