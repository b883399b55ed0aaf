"""A run's dataset as the training and evaluation code read it: ``VideoDataset`` over the shards, and
making sure the run has them (generated here, downloaded from the run folder, or read from
``data.uri``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from job.config import Config, DataConfig, split_sizes
from job.data.shards import MANIFEST_NAME, SPLITS, DataError, _file_problem, _read_state, _shard_files, generate_dataset
from job.runtime.distributed import Topology
from job.runtime.signals import stop_point
from job.storage import Layout, RunStore

log = structlog.get_logger("job.data")


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
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"sample indices must be in 0..{self.num_samples - 1}")
        shard_of = np.searchsorted(self._shard_starts, indices, side="right") - 1
        videos = np.empty((len(indices), self.cfg.frames, self.cfg.height, self.cfg.width), dtype=np.uint8)
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            videos[rows] = self._videos[shard][indices[rows] - self._shard_starts[shard]]
        # numpy, not torch: torch's conversion spreads over its thread pool, which is slow while the
        # training step keeps the cores busy (docs/benchmarks.md). Both round x / 255 the same way.
        frames = np.divide(videos[:, None], np.float32(255.0), dtype=np.float32)
        return torch.from_numpy(frames), torch.from_numpy(self._labels[indices])


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
        write_dataset(cfg, store)
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


def write_dataset(cfg: Config, store: RunStore) -> dict[str, Any]:
    """Write the dataset with progress in the log, then mirror it to the
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
