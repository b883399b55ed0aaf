"""The data path against the training step on CPU: can the loader keep up? One JSON line per dataset.

    python bench/bench_loader.py [--repeats N] [--batches N] [--steps N] [--no-default]

- small: the `small` preset's dataset (1,200 x 8 x 32 x 32) and model. Loader: VideoDataset.get()
  on random batches of the preset's batch size drawn from the training split, as the training
  loop calls it (same thread, nothing prefetched), in samples/s. Training: the job's step
  (forward, compute_loss, backward, clip, AdamW, scheduler) on batches already loaded, with the
  torch threads a `python -m job train --preset small` process uses, in samples/s. The ratio
  loader / training must be at least 5: then reading costs at most a sixth of each step.
  Loader and training measurements alternate, --repeats times each; medians.
- default: the loader alone on the `default` data (10,000 x 16 x 64 x 64, 655 MB of uint8
  shards, memory-mapped), batches of 32. The default model's CPU step is not timed here (about
  75 s per batch of 32 on 2 cores; see the README), so there is no ratio for it.

The dataset is generated into a temporary folder just before, so its pages are in the page
cache: these are warm reads, as in every epoch after the first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import emit, median, note, spread, tokenizer_step

from job.config import build_config
from job.data.dataset import VideoDataset
from job.data.shards import generate_dataset
from job.models.tokenizer import initial_tokenizer
from job.runtime.device import pick_device
from job.training.optim import build_optimizer

TARGET = 5.0


def loader_rate(dataset: VideoDataset, batch_size: int, batches: int, seed: int) -> float:
    """Samples/s of get() over ``batches`` random training batches."""
    train = dataset.split("train")
    rng = np.random.default_rng(seed)
    plan = [train[rng.choice(len(train), batch_size, replace=False)] for _ in range(batches)]
    started = time.perf_counter()
    for indices in plan:
        dataset.get(indices)
    return batches * batch_size / (time.perf_counter() - started)


def train_rate(cfg, model, optimizer, scheduler, batches: list[torch.Tensor]) -> float:
    """Samples/s of the training step on batches already in memory."""
    started = time.perf_counter()
    for videos in batches:
        tokenizer_step(model, optimizer, scheduler, videos, cfg)
    return sum(len(v) for v in batches) / (time.perf_counter() - started)


def bench_small(work: Path, repeats: int, batches: int, steps: int) -> None:
    cfg = build_config("small")
    device = pick_device(cfg)
    generate_dataset(cfg.data, work / "small")
    dataset = VideoDataset(work / "small", cfg.data)
    batch_size = cfg.train.batch_size
    model = initial_tokenizer(cfg).to(device)  # as TokenizerTask builds it
    optimizer, scheduler = build_optimizer(model, cfg, 10_000)
    train = dataset.split("train")
    step_batches = [dataset.get(train[i * batch_size : (i + 1) * batch_size])[0] for i in range(steps)]
    train_rate(cfg, model, optimizer, scheduler, step_batches[:3])  # warm-up: oneDNN primitives, allocator
    loader_rate(dataset, batch_size, 20, seed=99)
    loads, trains = [], []
    for k in range(repeats):
        note(f"small: repeat {k + 1}/{repeats}")
        loads.append(loader_rate(dataset, batch_size, batches, seed=k))
        trains.append(train_rate(cfg, model, optimizer, scheduler, step_batches))
    ratio = median(loads) / median(trains)
    emit(
        {
            "bench": "loader",
            "preset": "small",
            "what": "VideoDataset.get samples/s on random training batches / training step samples/s, CPU",
            "ratio": round(ratio, 1),
            "target": TARGET,
            "met": ratio >= TARGET,
            "loader_samples_per_s": round(median(loads), 1),
            "train_samples_per_s": round(median(trains), 2),
            "loader_share_of_step": round(median(trains) / median(loads), 4),
            "loader_repeats": spread(loads, 1),
            "train_repeats": spread(trains, 2),
            "batch_size": batch_size,
            "loader_batches": batches,
            "train_steps": steps,
            "shape": [cfg.data.frames, cfg.data.height, cfg.data.width],
            "samples": cfg.data.num_samples,
        },
        torch_threads=torch.get_num_threads(),
    )


def bench_default_loader(work: Path, repeats: int, batches: int) -> None:
    cfg = build_config("default")
    started = time.perf_counter()
    generate_dataset(cfg.data, work / "default")
    generated = time.perf_counter() - started
    dataset = VideoDataset(work / "default", cfg.data)
    batch_size = cfg.train.batch_size
    loader_rate(dataset, batch_size, 10, seed=99)
    loads = []
    for k in range(repeats):
        note(f"default: loader repeat {k + 1}/{repeats}")
        loads.append(loader_rate(dataset, batch_size, batches, seed=k))
    emit(
        {
            "bench": "loader",
            "preset": "default",
            "what": "VideoDataset.get samples/s on random training batches of the default data (loader only)",
            "loader_samples_per_s": round(median(loads), 1),
            "loader_repeats": spread(loads, 1),
            "batch_size": batch_size,
            "loader_batches": batches,
            "shape": [cfg.data.frames, cfg.data.height, cfg.data.width],
            "samples": cfg.data.num_samples,
            "generate_seconds": round(generated, 2),
            "note": "no training-step ratio: the default model's CPU step is not timed here",
        },
        torch_threads=torch.get_num_threads(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=200, help="loader batches per repeat")
    parser.add_argument("--steps", type=int, default=8, help="training steps per repeat (small)")
    parser.add_argument("--no-default", action="store_true", help="skip the default-data loader")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        bench_small(Path(tmp), args.repeats, args.batches, args.steps)
        if not args.no_default:
            bench_default_loader(Path(tmp), args.repeats, args.batches)


if __name__ == "__main__":
    main()
