"""How much work elsewhere on the machine slows the training step, whatever process it runs in.

    python bench/bench_contention.py [--preset smoke] [--repeats 2]

The bare training loop of bench_overhead.py (same preset, steps and torch threads), alone and
with one other process at nice 19 doing, the whole time, one kind of work that the job's helpers
do: spinning in pure Python (the interpreter only), building and parsing JSON (Python objects:
like botocore and matplotlib), copying a 64 MB array (memory traffic: like serializing, hashing,
sending and receiving checkpoints). Ratios against the loop alone, measured in the same run.

Read with bench_overhead.py: on a machine whose cores share caches and memory bandwidth, the
job's background work (plot worker, upload workers, and here the S3 endpoint itself) costs the
training step time even when it runs in other processes at the lowest priority on another core,
in proportion to how much memory it touches, not to how much of the GIL it holds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_overhead import WARMUP_STEPS, bare_loop
from common import emit, median, note, spread

from job.config import build_config, steps_per_epoch
from job.data.dataset import VideoDataset
from job.data.shards import generate_dataset
from job.runtime.device import pick_device

# Each runs until killed, at nice 19: the least claim on a CPU a process can make.
LOADS = {
    "python_spin": "while True:\n    pass",
    "python_objects": (
        "import json\n"
        "record = {str(i): [i] * 10 for i in range(2000)}\n"
        "while True:\n    json.loads(json.dumps(record))"
    ),
    "memory_copy_64mb": (
        "import numpy as np\n"
        "source = np.ones(64 * 2**20 // 8)\n"
        "while True:\n    copy = source.copy()\n    copy += 1"
    ),
}


def with_load(code: str | None, run):
    if code is None:
        return run()
    helper = subprocess.Popen([sys.executable, "-c", f"import os\nos.nice(19)\n{code}"])
    try:
        time.sleep(0.5)  # started and busy
        return run()
    finally:
        helper.kill()
        helper.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    cfg = build_config(args.preset, None, [f"train.epochs={args.epochs}"])
    device = pick_device(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    total_steps = cfg.train.epochs * steps_per_epoch(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        generate_dataset(cfg.data, Path(tmp))
        dataset = VideoDataset(Path(tmp), cfg.data)
        bare_loop(cfg, dataset, device, total_steps, max_steps=WARMUP_STEPS)  # oneDNN primitives for these shapes
        variants: dict[str, str | None] = {"alone": None, **LOADS}
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for k in range(args.repeats):
            order = list(variants) if k % 2 == 0 else list(variants)[::-1]  # ABBA
            for name in order:
                note(f"contention: repeat {k + 1}/{args.repeats}, {name}")
                result = with_load(variants[name], lambda: bare_loop(cfg, dataset, device, total_steps))
                seconds[name].append(result["loop"])
    alone = median(seconds["alone"])
    emit(
        {
            "bench": "contention",
            "preset": args.preset,
            "what": "bare training loop with one nice-19 process busy on the machine / the loop alone",
            "steps": total_steps,
            "ratios": {name: round(median(seconds[name]) / alone, 3) for name in LOADS},
            "seconds": {name: spread(values, 3) for name, values in seconds.items()},
            "repeats": args.repeats,
        },
        torch_threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    main()
