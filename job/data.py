"""Synthetic trajectory videos (SPEC §5): generation, validation, shards on disk, and reading.

A sample is a small bright blob moving along a 3D path (one path family per class), seen
through a pinhole camera as ``frames`` grayscale images. Sample ``i`` is a pure function of
(seed, i): its random numbers come from a counter-based generator keyed on both, so any range
of samples can be generated alone, in any order, and match byte for byte.

On disk a dataset is a folder of ``.npy`` shards (uint8 videos, int64 labels) and a
``manifest.json`` written last, which records every file's sha256 and size.

torch is imported only where tensors are made: ``job.config`` imports this module to validate
class names, and ``status`` must run without torch (SPEC §9).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from job.config import DataConfig, split_sizes
from job.fsutil import atomic_write_bytes, atomic_write_json, sha256_file, sha256_stream

if TYPE_CHECKING:
    import torch


class DataError(Exception):
    """Input data a run cannot use; the command line turns it into exit code 3."""


FORMAT = 1
MANIFEST_NAME = "manifest.json"
PARTIAL_NAME = ".partial.json"  # shards finished by a generation that has not written its manifest yet
SPLITS = ("train", "val", "test")

# Geometry in path units: every canonical path spans about ±0.5 around the origin.
CAMERA_DISTANCE = 2.5  # the camera sits on the -z axis and looks at the origin
HALF_VIEW = 0.85  # path units from the centre to the frame's edge, at the origin's depth
MAX_TRANSLATION = 0.15  # per axis; with HALF_VIEW this keeps the blob's centre inside the frame
MAX_TILT = np.radians(30.0)  # out of the image plane; more would show circles edge-on, as lines
HELIX_LEAN = np.radians(60.0)  # tips the helix axis sideways so that its turns show as loops

# A frame shows the object when its brightest pixel reaches 20% of full intensity.
VISIBLE_PIXEL = 51
MIN_VISIBLE_FRACTION = 0.75

# Samples rendered together: their float32 scratch (32 x 16 x 64 x 64 x 4 B = 8 MiB) stays in
# the L3 cache, which measured twice as fast as chunks of 128.
RENDER_CHUNK = 32

# --- random numbers -------------------------------------------------------------------------

_UINT64_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STREAM_SHAPE, _STREAM_POSE, _STREAM_NOISE = 1, 2, 3  # separate streams: a new draw in one never shifts another
_SHAPE_PARAMS = 5
_POSE_PARAMS = 7  # spin, two tilts, three translations, noise std


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 whose outputs pass as independent.
    uint64 array arithmetic wraps silently, which is what the hash relies on."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, indices: np.ndarray, stream: int, count: int) -> np.ndarray:
    """(len(indices), count) floats in [0, 1); entry (r, c) depends only on (seed, indices[r], stream, c)."""
    seed_word = np.full(len(indices), (seed + _GOLDEN) & _UINT64_MASK, dtype=np.uint64)
    key = _mix64(_mix64(seed_word) ^ indices.astype(np.uint64))
    key = _mix64(key + np.uint64((stream * _GOLDEN) & _UINT64_MASK))
    counters = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
    bits = _mix64(key[:, None] + counters[None, :])
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


_PATHS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "linear": _linear_path,
    "circular": _circular_path,
    "helical": _helical_path,
    "parabolic": _parabolic_path,
    "sinusoidal": _sinusoidal_path,
}
TRAJECTORY_CLASSES: tuple[str, ...] = tuple(_PATHS)


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


# --- validation -----------------------------------------------------------------------------------


def validate_samples(videos: np.ndarray, labels: np.ndarray, start: int, cfg: DataConfig) -> None:
    """Raise DataError naming the first bad sample (global index ``start + row``) and why."""
    expected_shape = (cfg.frames, cfg.height, cfg.width)
    span = f"samples {start}..{start + len(labels) - 1}"
    if videos.ndim != 4 or videos.shape[1:] != expected_shape:
        expected = ", ".join(map(str, expected_shape))
        raise DataError(f"{span}: videos have shape {videos.shape}, expected (n, {expected})")
    if labels.shape != (len(videos),):
        raise DataError(f"{span}: labels have shape {labels.shape}, expected ({len(videos)},)")
    _check_pixel_type(videos, start, span)
    _check_labels(labels, start, span, cfg)
    _check_visibility(videos, start)


def _first_bad(bad_rows: np.ndarray, start: int) -> int | None:
    rows = np.flatnonzero(bad_rows)
    return start + int(rows[0]) if len(rows) else None


def _check_pixel_type(videos: np.ndarray, start: int, span: str) -> None:
    """Shards hold uint8; for other arrays, name the first sample whose values could not be
    stored as uint8 before refusing the dtype, since that is the fix a user needs."""
    if videos.dtype == np.uint8:
        return
    flat = videos.reshape(len(videos), -1)
    if np.issubdtype(videos.dtype, np.floating):
        checks = [
            (~np.isfinite(flat), "not finite (NaN or inf pixels)"),
            ((flat < 0) | (flat > 1), "pixels outside [0, 1]"),
        ]
    elif np.issubdtype(videos.dtype, np.integer):
        checks = [((flat < 0) | (flat > 255), "pixels outside 0..255")]
    else:
        checks = []
    for bad_pixels, why in checks:
        sample = _first_bad(bad_pixels.any(axis=1), start)
        if sample is not None:
            raise DataError(f"sample {sample}: {why}")
    raise DataError(f"{span}: videos have dtype {videos.dtype}, expected uint8 (pixel = round(255 * intensity))")


def _check_labels(labels: np.ndarray, start: int, span: str, cfg: DataConfig) -> None:
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{span}: labels have dtype {labels.dtype}, expected int64")
    sample = _first_bad((labels < 0) | (labels >= len(cfg.classes)), start)
    if sample is not None:
        label = labels[sample - start]
        raise DataError(f"sample {sample}: label {label} outside 0..{len(cfg.classes) - 1}")
    counts = np.bincount(labels, minlength=len(cfg.classes))
    if counts.max() - counts.min() > 1:
        per_class = ", ".join(f"{name}={count}" for name, count in zip(cfg.classes, counts.tolist()))
        raise DataError(f"{span}: classes unbalanced ({per_class}); counts must be within 1 of each other")


def _check_visibility(videos: np.ndarray, start: int) -> None:
    visible = videos.max(axis=(2, 3)) >= VISIBLE_PIXEL
    frames_needed = MIN_VISIBLE_FRACTION * videos.shape[1]
    sample = _first_bad(visible.sum(axis=1) < frames_needed, start)
    if sample is not None:
        shown = int(visible[sample - start].sum())
        raise DataError(
            f"sample {sample}: object visible in only {shown} of {videos.shape[1]} frames "
            f"(needs {MIN_VISIBLE_FRACTION:.0%} with a pixel >= {VISIBLE_PIXEL})"
        )


# --- shards on disk ----------------------------------------------------------------------------


def data_config_dict(cfg: DataConfig) -> dict[str, Any]:
    """The fields that define the data, as JSON values; ``uri`` only says where it lives."""
    fields = dataclasses.asdict(cfg)
    del fields["uri"]
    return json.loads(json.dumps(fields))


def _config_mismatch(recorded: Any, cfg: DataConfig, source: Path) -> DataError | None:
    expected = data_config_dict(cfg)
    recorded = recorded if isinstance(recorded, dict) else {}
    differing = sorted(key for key in set(expected) | set(recorded) if recorded.get(key) != expected.get(key))
    if not differing:
        return None
    details = ", ".join(f"{key}: {recorded.get(key)!r} there, {expected.get(key)!r} here" for key in differing)
    return DataError(f"{source}: data config differs in {', '.join(differing)} ({details})")


def _read_state(path: Path, cfg: DataConfig) -> list[dict[str, Any]]:
    """The shard records of a manifest or progress file, after refusing one that describes
    other data or is malformed."""
    try:
        state = json.loads(path.read_text())
        mismatch = _config_mismatch(state.get("data_config"), cfg, path)
        if mismatch is None:
            for shard in state["shards"]:
                _check_shard_record(shard)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a valid dataset manifest ({exc})") from exc
    if mismatch:
        raise mismatch
    return state["shards"]


def _check_shard_record(shard: dict[str, Any]) -> None:
    """Raise ValueError unless ``shard`` is a well-formed record. Its file names must be the
    expected ones, so that a manifest can never point a reader outside its folder."""
    if not all(isinstance(shard[key], int) for key in ("index", "start", "count")):
        raise ValueError("shard records need integer index, start and count")
    expected_files = set(_shard_files(shard["index"]))
    if set(shard["files"]) != expected_files:
        raise ValueError(f"shard {shard['index']} lists {sorted(shard['files'])}, expected {sorted(expected_files)}")
    for record in shard["files"].values():
        if not isinstance(record["size"], int) or not isinstance(record["sha256"], str):
            raise ValueError(f"shard {shard['index']}: file records need an integer size and a sha256 string")


def _shard_files(index: int) -> tuple[str, str]:
    return f"shard-{index:05d}.videos.npy", f"shard-{index:05d}.labels.npy"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_shard(directory: Path, index: int, start: int, videos: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    files = {}
    for name, array in zip(_shard_files(index), (videos, labels)):
        payload = _npy_bytes(array)
        atomic_write_bytes(directory / name, payload)
        files[name] = {"sha256": sha256_stream(io.BytesIO(payload)), "size": len(payload)}
    return {"index": index, "start": start, "count": len(labels), "files": files}


def _file_problem(directory: Path, name: str, record: dict[str, Any], check_hash: bool) -> str | None:
    """Why ``name`` does not match its manifest record, or None when it does."""
    path = directory / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != record["size"]:
        return f"size {size} bytes, manifest says {record['size']}"
    if check_hash and sha256_file(path) != record["sha256"]:
        return "sha256 does not match the manifest (corrupted)"
    return None


def _shard_intact(directory: Path, shard: dict[str, Any], check_hash: bool) -> bool:
    return all(_file_problem(directory, name, record, check_hash) is None for name, record in shard["files"].items())


def _shard_plan(cfg: DataConfig) -> list[tuple[int, int, int]]:
    """(index, start, stop) of every shard."""
    starts = range(0, cfg.num_samples, cfg.shard_size)
    return [(index, start, min(start + cfg.shard_size, cfg.num_samples)) for index, start in enumerate(starts)]


def _manifest(cfg: DataConfig, shards: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "data_config": data_config_dict(cfg),
        "num_samples": cfg.num_samples,
        "shape": [cfg.frames, cfg.height, cfg.width],
        "classes": list(cfg.classes),
        "shards": shards,
    }


def generate_dataset(
    cfg: DataConfig, directory: Path, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Write the dataset's shards into ``directory``, then its manifest; return the manifest.

    Every shard is validated before it is written. Resumable by shard: a shard whose files
    match the hashes recorded by an earlier, interrupted generation is kept. ``progress(done,
    total)`` is called after each shard, kept or written. A complete dataset of the same config
    is returned without work; one of another config raises DataError rather than being
    overwritten.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path, partial_path = directory / MANIFEST_NAME, directory / PARTIAL_NAME
    recorded: dict[int, dict[str, Any]] = {}
    if manifest_path.exists():
        shards = _read_state(manifest_path, cfg)
        if all(_shard_intact(directory, shard, check_hash=False) for shard in shards):
            return _manifest(cfg, shards)
        recorded.update((shard["index"], shard) for shard in shards)
    if partial_path.exists():
        recorded.update((shard["index"], shard) for shard in _read_state(partial_path, cfg))

    done: list[dict[str, Any]] = []
    for index, start, stop in _shard_plan(cfg):
        shard = recorded.get(index)
        planned = shard is not None and (shard["start"], shard["count"]) == (start, stop - start)
        if not (planned and _shard_intact(directory, shard, check_hash=True)):
            videos, labels = generate_samples(cfg, start, stop)
            validate_samples(videos, labels, start, cfg)
            shard = _write_shard(directory, index, start, videos, labels)
        done.append(shard)
        atomic_write_json(partial_path, {"data_config": data_config_dict(cfg), "shards": done})
        if progress is not None:
            progress(stop, cfg.num_samples)

    manifest = _manifest(cfg, done)
    atomic_write_json(manifest_path, manifest)
    partial_path.unlink(missing_ok=True)
    return manifest


# --- reading ------------------------------------------------------------------------------------


class VideoDataset:
    """A dataset folder checked against its manifest, with shards memory-mapped, not loaded."""

    def __init__(self, directory: Path, cfg: DataConfig, verify: bool = True) -> None:
        self.directory = Path(directory)
        self.cfg = cfg
        manifest_path = self.directory / MANIFEST_NAME
        if not manifest_path.exists():
            raise DataError(f"{manifest_path}: no dataset manifest; generate the dataset first")
        shards = sorted(_read_state(manifest_path, cfg), key=lambda shard: shard["start"])
        self._check_coverage(shards, manifest_path)
        for shard in shards:
            for name, record in shard["files"].items():
                problem = _file_problem(self.directory, name, record, check_hash=verify)
                if problem:
                    raise DataError(f"{self.directory / name}: {problem}")
        self._shard_starts = np.array([shard["start"] for shard in shards], dtype=np.int64)
        self._videos = [self._load_videos(shard) for shard in shards]
        self._labels = np.concatenate([self._load_labels(shard) for shard in shards])
        self.num_samples = cfg.num_samples

    def _check_coverage(self, shards: list[dict[str, Any]], manifest_path: Path) -> None:
        expected_start = 0
        for shard in shards:
            if shard["start"] != expected_start:
                where = f"shard {shard['index']} starts at {shard['start']}"
                raise DataError(f"{manifest_path}: {where}, expected {expected_start}")
            expected_start += shard["count"]
        if expected_start != self.cfg.num_samples:
            held = f"shards hold {expected_start} samples"
            raise DataError(f"{manifest_path}: {held}, config says {self.cfg.num_samples}")

    def _load(self, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        path = self.directory / name
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"{path}: not a plain .npy array ({exc})") from exc
        if array.dtype != dtype or array.shape != shape:
            raise DataError(f"{path}: holds {array.dtype}{list(array.shape)}, expected {np.dtype(dtype)}{list(shape)}")
        return array

    def _load_videos(self, shard: dict[str, Any]) -> np.ndarray:
        shape = (shard["count"], self.cfg.frames, self.cfg.height, self.cfg.width)
        return self._load(_shard_files(shard["index"])[0], np.uint8, shape)

    def _load_labels(self, shard: dict[str, Any]) -> np.ndarray:
        # Labels are small, so they live in RAM; a bad one is caught here rather than mid-training.
        labels = np.array(self._load(_shard_files(shard["index"])[1], np.int64, (shard["count"],)))
        bad = np.flatnonzero((labels < 0) | (labels >= len(self.cfg.classes)))
        if len(bad):
            sample = shard["start"] + int(bad[0])
            raise DataError(f"sample {sample}: label {labels[bad[0]]} outside 0..{len(self.cfg.classes) - 1}")
        return labels

    def split(self, name: str) -> np.ndarray:
        """Global indices of ``train``, ``val`` or ``test``: contiguous ranges in that order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose {', '.join(SPLITS)}")
        bounds = np.cumsum((0, *split_sizes(self.cfg)))
        position = SPLITS.index(name)
        return np.arange(bounds[position], bounds[position + 1], dtype=np.int64)

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Videos float32 (B, 1, T, H, W) in [0, 1] and labels int64 (B,), in the order of ``indices``."""
        import torch

        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"sample indices must be in 0..{self.num_samples - 1}")
        shard_of = np.searchsorted(self._shard_starts, indices, side="right") - 1
        videos = np.empty((len(indices), self.cfg.frames, self.cfg.height, self.cfg.width), dtype=np.uint8)
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            videos[rows] = self._videos[shard][indices[rows] - self._shard_starts[shard]]
        # numpy, not torch: torch's conversion spreads over its thread pool, which measured 10x
        # slower while the training step keeps the cores busy. Both round x / 255 the same way.
        frames = np.divide(videos[:, None], np.float32(255.0), dtype=np.float32)
        return torch.from_numpy(frames), torch.from_numpy(self._labels[indices])
