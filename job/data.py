"""Datasets on disk (SPEC §5): validation, shards and their manifest, reading, and the data of a run.

On disk a dataset is a folder of ``.npy`` shards (uint8 videos, int64 labels) and a
``manifest.json`` written last, which records every file's sha256 and size. A run's dataset is
the local copy, else the run folder's (downloaded and verified), else freshly generated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from job.config import Config, DataConfig, split_sizes
from job.fsutil import atomic_write_bytes, atomic_write_json, sha256_file
from job.monitoring.lifecycle import stop_point
from job.storage import Layout, RunStore
from job.synthetic import generate_samples

if TYPE_CHECKING:
    import torch

    from job.distributed import Topology

log = structlog.get_logger("job.data")


class DataError(Exception):
    """Input data a run cannot use; the command line turns it into exit code 3."""


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
            stop_point("checking the dataset")
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

    @property
    def labels(self) -> np.ndarray:
        """The class of every sample, by index."""
        return self._labels

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


# --- the data of a run ----------------------------------------------------------------------------


def data_directory(cfg: Config, store: RunStore) -> Path:
    if cfg.data.uri:
        return Path(cfg.data.uri).expanduser()
    return store.local_path(Layout.data_manifest).parent


def prepare_dataset_in_turn(cfg: Config, store: RunStore, topology: Topology) -> VideoDataset:
    """Rank 0 generates or downloads the data first; the others then find it (same host) or
    fetch or regenerate the same bytes (another host)."""
    if topology.is_writer:
        dataset = prepare_dataset(cfg, store)
    topology.barrier()
    return dataset if topology.is_writer else prepare_dataset(cfg, store)


def prepare_dataset(cfg: Config, store: RunStore) -> VideoDataset:
    """Open the dataset: the local copy, else the run folder's (downloaded, then verified against
    its manifest), else a freshly generated one."""
    directory = data_directory(cfg, store)
    if not (directory / MANIFEST_NAME).exists() and not (cfg.data.uri or download_dataset(store)):
        run_generate(cfg, store)
    return VideoDataset(directory, cfg.data, verify=True)


def download_dataset(store: RunStore) -> bool:
    """Fetch the run folder's shards into the local copy, manifest last; False if it has none."""
    manifest = store.read_json(Layout.data_manifest)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        return False
    log.info("data.download", shards=len(manifest["shards"]))
    for shard in manifest["shards"]:
        for filename in shard.get("files", {}):
            stop_point("downloading the dataset")  # the local manifest, fetched last, is not there yet
            if store.fetch(f"{Layout.data}/{Path(filename).name}") is None:
                raise DataError(f"{Layout.data}/{filename} is listed in the run's data manifest but missing")
    store.fetch(Layout.data_manifest)
    return True


def run_generate(cfg: Config, store: RunStore) -> dict[str, Any]:
    """The ``generate`` mode: write the dataset with progress in the log, then mirror it to the
    run folder, shards first and the manifest that lists them last."""
    directory = data_directory(cfg, store)
    started = time.monotonic()

    def report(done: int, total: int) -> None:
        elapsed = time.monotonic() - started
        log.info(
            "generate.progress", samples=done, total=total, percent=round(100 * done / total, 1),
            samples_per_second=round(done / elapsed, 1) if elapsed > 0 else None,
        )

    log.info("generate.start", directory=str(directory), samples=cfg.data.num_samples)
    manifest = generate_dataset(cfg.data, directory, progress=report)
    log.info("generate.done", seconds=round(time.monotonic() - started, 2), shards=len(manifest["shards"]))
    if not cfg.data.uri:
        for shard in manifest["shards"]:
            for filename in shard["files"]:
                store.publish(f"{Layout.data}/{filename}")
        store.publish(Layout.data_manifest)
    return manifest
