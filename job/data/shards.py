"""Datasets on disk (docs/model-and-data.md): generating them in shards, validating every sample,
and the manifest that lists the shards.

On disk a dataset is a folder of ``.npy`` shards (uint8 videos, int64 labels) and a
``manifest.json`` written last, which records every file's sha256 and size. Reading them, and
finding a run's dataset, is ``job.data.dataset``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from job.config import DataConfig
from job.data.synthetic import generate_samples
from job.exits import EXIT_BAD_DATA
from job.runtime.files import atomic_write_bytes, atomic_write_json, sha256_file
from job.runtime.signals import stop_point

if TYPE_CHECKING:

    pass

log = structlog.get_logger("job.data")


class DataError(Exception):
    """Input data a run cannot use (exit 3)."""

    exit_code, summary = EXIT_BAD_DATA, "bad input data"


FORMAT = 1
MANIFEST_NAME = "manifest.json"
PARTIAL_NAME = ".partial.json"  # shards finished by a generation that has not written its manifest yet
SPLITS = ("train", "val", "test")

# A frame shows the object when its brightest pixel reaches 20% of full intensity.
VISIBLE_PIXEL = 51
MIN_VISIBLE_FRACTION = 0.75


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
        files[name] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
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
        stop_point("generating the dataset")  # the shards so far are recorded; the manifest is not written
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
