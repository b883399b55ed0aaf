"""Data generation and loading speed, as one JSON line.

    python bench/bench_data.py [--samples N] [--loop-samples N] [--dataset-samples N]

Measures generate_samples over N samples of the default DataConfig (target: 10,000 in under
30 s), a per-sample loop over a subset as the baseline (extrapolated to N), and
VideoDataset.get() on random batches of 32 from a dataset written to a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from job.config import DataConfig
from job.data.dataset import VideoDataset
from job.data.shards import generate_dataset
from job.data.synthetic import generate_samples

TARGET_SECONDS = 30.0
BATCH_SIZE = 32
BATCHES = 200


def seconds_for(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def generation_rates(cfg: DataConfig, samples: int, loop_samples: int) -> dict[str, float]:
    vectorised = seconds_for(lambda: generate_samples(cfg, 0, samples))
    # The baseline draws the same samples one call at a time: what a per-sample renderer costs.
    loop_samples = min(loop_samples, samples)
    loop = seconds_for(lambda: [generate_samples(cfg, i, i + 1) for i in range(loop_samples)])
    return {"vectorised": samples / vectorised, "loop": loop_samples / loop, "seconds": vectorised}


def get_rates(cfg: DataConfig, dataset_samples: int) -> dict[str, float]:
    """Samples/s of get() on random batches: the first pass maps the shards' pages in,
    the second reads them warm, as every epoch after the first does."""
    data_cfg = dataclasses.replace(cfg, num_samples=dataset_samples)
    rng = np.random.default_rng(0)
    batches = [rng.choice(dataset_samples, BATCH_SIZE, replace=False) for _ in range(BATCHES)]
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        generate_dataset(data_cfg, Path(folder))
        dataset = VideoDataset(Path(folder), data_cfg)
        dataset.get(batches[0][:1])  # the first call imports torch
        for name in ("first_pass", "warm"):
            seconds = seconds_for(lambda: [dataset.get(batch) for batch in batches])
            rates[name] = BATCHES * BATCH_SIZE / seconds
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000, help="samples generated in one vectorised call")
    parser.add_argument("--loop-samples", type=int, default=300, help="samples of the per-sample baseline")
    parser.add_argument("--dataset-samples", type=int, default=2_000, help="size of the dataset read by get()")
    args = parser.parse_args()

    cfg = DataConfig()
    rates = generation_rates(cfg, args.samples, args.loop_samples)
    reading = get_rates(cfg, args.dataset_samples)
    result = {
        "samples": args.samples,
        "shape": [cfg.frames, cfg.height, cfg.width],
        "vectorised_samples_per_s": round(rates["vectorised"], 1),
        "loop_samples_per_s": round(rates["loop"], 1),
        "speedup_vs_loop": round(rates["vectorised"] / rates["loop"], 1),
        "seconds": round(rates["seconds"], 2),
        "loop_seconds_extrapolated": round(args.samples / rates["loop"], 1),
        "meets_target": bool(rates["seconds"] * 10_000 / args.samples < TARGET_SECONDS),
        "target_seconds_per_10k": TARGET_SECONDS,
        "get_first_pass_samples_per_s": round(reading["first_pass"], 1),
        "get_warm_samples_per_s": round(reading["warm"], 1),
        "get_dataset_samples": args.dataset_samples,
        "get_batch_size": BATCH_SIZE,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
