"""Video files a person opens: frames as a PNG strip, an animated GIF, and the raw frames as .npy
(no pickle)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

PIXELS_SHOWN = 96  # frames are scaled up (nearest) to at least this many pixels high in PNGs and GIFs
GIF_FRAME_MS = 250
GAP_PIXELS = 2


def _scale(frames: np.ndarray) -> int:
    return max(1, -(-PIXELS_SHOWN // frames.shape[-2]))


def _gray(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) in [0, 1] -> uint8, each frame scaled up by nearest neighbour."""
    scale = _scale(frames)
    pixels = np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)
    return pixels.repeat(scale, axis=-2).repeat(scale, axis=-1)


def strip_png(frames: np.ndarray) -> bytes:
    """The frames (T, H, W) side by side, gray, with a mid-gray gap between them."""
    scaled = _gray(frames)
    t, h, w = scaled.shape
    strip = np.full((h, t * w + (t - 1) * GAP_PIXELS), 128, dtype=np.uint8)
    for i, frame in enumerate(scaled):
        strip[:, i * (w + GAP_PIXELS) : i * (w + GAP_PIXELS) + w] = frame
    out = io.BytesIO()
    Image.fromarray(strip, mode="L").save(out, format="PNG")
    return out.getvalue()


def animated_gif(frames: np.ndarray) -> bytes:
    """An animated GIF of the frames (T, H, W), looping, with a progress bar under each frame
    (which also keeps Pillow from merging identical consecutive frames: one GIF frame per frame)."""
    scaled = _gray(frames)
    t, h, w = scaled.shape
    bar = max(2, h // 32)
    images = []
    for i, frame in enumerate(scaled):
        canvas = np.full((h + bar, w), 64, dtype=np.uint8)
        canvas[:h] = frame
        canvas[h:, : max(1, round(w * (i + 1) / t))] = 255
        images.append(Image.fromarray(canvas, mode="L"))
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)
    return out.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()
