"""Synthetic trajectory videos (docs/model-and-data.md): how one sample is made.

A sample is a small bright blob moving along a 3D path (one path family per class), seen
through a pinhole camera as ``frames`` grayscale images. Sample ``i`` is a pure function of
(seed, i): its random numbers come from a counter-based generator keyed on both, so any range
of samples can be generated alone, in any order, and match byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from job.config import TRAJECTORY_CLASSES, DataConfig

# Geometry in path units: every canonical path spans about ±0.5 around the origin.
CAMERA_DISTANCE = 2.5  # the camera sits on the -z axis and looks at the origin
HALF_VIEW = 0.85  # path units from the centre to the frame's edge, at the origin's depth
MAX_TRANSLATION = 0.15  # per axis; with HALF_VIEW this keeps the blob's centre inside the frame
MAX_TILT = np.radians(30.0)  # out of the image plane; more would show circles edge-on, as lines
HELIX_LEAN = np.radians(60.0)  # tips the helix axis sideways so that its turns show as loops

# Samples rendered together: their float32 scratch (32 x 16 x 64 x 64 x 4 B = 8 MiB) stays in
# the L3 cache (docs/benchmarks.md, "Why the code is as it is").
RENDER_CHUNK = 32

# --- random numbers -------------------------------------------------------------------------

_UINT64_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STREAM_SHAPE, _STREAM_POSE, _STREAM_NOISE = 1, 2, 3  # separate streams: a new draw in one never shifts another
_SHAPE_PARAMS = 5
_POSE_PARAMS = 7  # spin, two tilts, three translations, noise std


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 whose outputs pass as independent.
    uint64 array arithmetic wraps silently, which is what the hash relies on."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, indices: np.ndarray, stream: int, count: int) -> np.ndarray:
    """(len(indices), count) floats in [0, 1); entry (r, c) depends only on (seed, indices[r], stream, c)."""
    seed_word = np.full(len(indices), (seed + _GOLDEN) & _UINT64_MASK, dtype=np.uint64)
    key = mix64(mix64(seed_word) ^ indices.astype(np.uint64))
    key = mix64(key + np.uint64((stream * _GOLDEN) & _UINT64_MASK))
    counters = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
    bits = mix64(key[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _normals(seed: int, indices: np.ndarray, stream: int, count: int) -> np.ndarray:
    """Standard normal draws by Box-Muller, with the same purity as ``_uniforms``."""
    u = _uniforms(seed, indices, stream, 2 * count)
    return np.sqrt(-2.0 * np.log1p(-u[:, :count])) * np.cos(2.0 * np.pi * u[:, count:])


# --- paths ------------------------------------------------------------------------------------
# Each maps shape parameters (m, _SHAPE_PARAMS) in [0, 1) and times t (T,) in [0, 1] to points
# (m, T, 3) in the image plane's orientation, before the random pose is applied.


def _stack(x: Any, y: Any, z: Any) -> np.ndarray:
    return np.stack(np.broadcast_arrays(x, y, z), axis=-1)


def _direction(s: np.ndarray) -> np.ndarray:
    return np.where(s < 0.5, -1.0, 1.0)


def _linear_path(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    length = 0.6 + 0.4 * s[:, 0:1]
    return _stack(length * (t - 0.5), 0.0, 0.0)


def _circular_path(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    radius = 0.3 + 0.15 * s[:, 0:1]
    sweep = 2.0 * np.pi * (0.8 + 0.2 * s[:, 1:2]) * _direction(s[:, 3:4])  # most of one turn
    angle = 2.0 * np.pi * s[:, 2:3] + sweep * t
    return _stack(radius * np.cos(angle), radius * np.sin(angle), 0.0)


def _helical_path(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    radius = 0.2 + 0.08 * s[:, 0:1]
    turns = 1.5 + s[:, 1:2]  # more than the circle's one, few enough to stay apart in 16 frames
    angle = 2.0 * np.pi * (s[:, 2:3] + turns * t * _direction(s[:, 3:4]))
    along = (0.8 + 0.2 * s[:, 4:5]) * (t - 0.5)
    x, y = radius * np.cos(angle), radius * np.sin(angle)
    lean_cos, lean_sin = np.cos(HELIX_LEAN), np.sin(HELIX_LEAN)
    return _stack(x * lean_cos + along * lean_sin, y, along * lean_cos - x * lean_sin)


def _parabolic_path(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    length = 0.6 + 0.4 * s[:, 0:1]
    height = 0.4 + 0.3 * s[:, 1:2]
    apex = 0.35 + 0.3 * s[:, 2:3]
    return _stack(length * (t - 0.5), height * (0.5 - ((t - apex) / 0.65) ** 2), 0.0)


def _sinusoidal_path(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    length = 0.6 + 0.4 * s[:, 0:1]
    amplitude = 0.12 + 0.1 * s[:, 1:2]
    cycles = 1.0 + s[:, 2:3]
    return _stack(length * (t - 0.5), amplitude * np.sin(2.0 * np.pi * (cycles * t + s[:, 3:4])), 0.0)


# One path family per class, in the order config.TRAJECTORY_CLASSES names them.
_PATHS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = dict(
    zip(TRAJECTORY_CLASSES, (_linear_path, _circular_path, _helical_path, _parabolic_path, _sinusoidal_path), strict=True)
)


# --- pose, camera, rendering -------------------------------------------------------------------


def _rotations(axis: int, angles: np.ndarray) -> np.ndarray:
    """(m, 3, 3) right-handed rotations by ``angles`` about coordinate ``axis``."""
    i, j = ((1, 2), (2, 0), (0, 1))[axis]
    cos, sin = np.cos(angles), np.sin(angles)
    rot = np.zeros((len(angles), 3, 3))
    rot[:, axis, axis] = 1.0
    rot[:, i, i], rot[:, j, j] = cos, cos
    rot[:, i, j], rot[:, j, i] = -sin, sin
    return rot


def _world_points(cfg: DataConfig, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(m, T, 3) object positions: the class's path, randomly posed, plus point noise."""
    t = np.linspace(0.0, 1.0, cfg.frames)
    shape = _uniforms(cfg.seed, indices, _STREAM_SHAPE, _SHAPE_PARAMS)
    points = np.empty((len(indices), cfg.frames, 3))
    for label, name in enumerate(cfg.classes):
        chosen = labels == label
        if chosen.any():
            points[chosen] = _PATHS[name](shape[chosen], t)

    pose = _uniforms(cfg.seed, indices, _STREAM_POSE, _POSE_PARAMS)
    rotation = (
        _rotations(0, MAX_TILT * (2.0 * pose[:, 1] - 1.0))
        @ _rotations(1, MAX_TILT * (2.0 * pose[:, 2] - 1.0))
        @ _rotations(2, 2.0 * np.pi * pose[:, 0])
    )
    shift = MAX_TRANSLATION * (2.0 * pose[:, 3:6] - 1.0)
    noise_std = cfg.noise_std_min + (cfg.noise_std_max - cfg.noise_std_min) * pose[:, 6]
    noise = _normals(cfg.seed, indices, _STREAM_NOISE, cfg.frames * 3).reshape(len(indices), cfg.frames, 3)
    posed = np.einsum("mij,mtj->mti", rotation, points)
    return posed + shift[:, None, :] + noise_std[:, None, None] * noise


def _project(points: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel column, row and blob std (each (m, T)) through the pinhole camera; nearer is bigger.
    ``blob_sigma`` is in pixels of the frame itself, not rescaled by its width: the presets pick
    it per frame size, and a rescaled 0.8 on 16x16 frames would be a 0.2-pixel, invisible blob."""
    scale = CAMERA_DISTANCE / (CAMERA_DISTANCE + points[..., 2])
    pixels_per_unit = min(cfg.height, cfg.width) / 2.0 / HALF_VIEW  # square pixels on any frame shape
    cols = (cfg.width - 1) / 2.0 + points[..., 0] * scale * pixels_per_unit
    rows = (cfg.height - 1) / 2.0 - points[..., 1] * scale * pixels_per_unit  # image rows grow downwards
    return cols, rows, cfg.blob_sigma * scale


def _render(cols: np.ndarray, rows: np.ndarray, sigma: np.ndarray, buffer: np.ndarray, out: np.ndarray) -> None:
    """Draw one Gaussian blob per frame into ``out`` (m, T, H, W) uint8, as round(255 * intensity).
    The blob is separable, so a frame is the outer product of a row profile and a column profile.
    ``buffer`` is float32 scratch space of at least ``out``'s size, reused so that each chunk
    does not fault in fresh pages."""
    height, width = out.shape[2:]
    inverse_var = (-0.5 / sigma**2)[..., None]
    across = np.exp(inverse_var * (np.arange(width) - cols[..., None]) ** 2).astype(np.float32)
    down = (255.0 * np.exp(inverse_var * (np.arange(height) - rows[..., None]) ** 2)).astype(np.float32)
    frames = buffer[: len(out)]
    np.multiply(down[..., :, None], across[..., None, :], out=frames)
    frames += 0.5  # the uint8 cast truncates, so this rounds
    np.copyto(out, frames, casting="unsafe")


def generate_samples(cfg: DataConfig, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start`` to ``stop - 1``: videos uint8 (n, T, H, W) and labels int64 (n,).
    Sample i has class i % len(classes), so every contiguous range is balanced."""
    indices = np.arange(start, stop, dtype=np.int64)
    labels = indices % len(cfg.classes)
    videos = np.empty((len(indices), cfg.frames, cfg.height, cfg.width), dtype=np.uint8)
    buffer = np.empty((min(len(indices), RENDER_CHUNK), *videos.shape[1:]), dtype=np.float32)
    for first in range(0, len(indices), RENDER_CHUNK):
        chunk = slice(first, first + RENDER_CHUNK)
        points = _world_points(cfg, indices[chunk], labels[chunk])
        _render(*_project(points, cfg), buffer=buffer, out=videos[chunk])
    return videos, labels
