"""The `default` preset on one GPU: samples/s with bf16 autocast, eager against torch.compile.

    python bench/bench_gpu.py [--steps 50] [--warmup 10] [--repeats 3]

Without a CUDA device it prints {"bench": "gpu", "skipped": "no CUDA device", ...} and exits 0.

On a GPU (a few minutes, most of it torch.compile's first compilation; meant to stay under 8):
the default dataset (10,000 x 16 x 64 x 64) is generated into a temporary folder, and the
job's training step runs on it exactly as TokenizerTask.train_step does (VideoDataset.get of a
batch in the job's epoch order, .to(device, non_blocking=True), bf16 autocast forward,
compute_loss, backward, clip, AdamW, scheduler, float(loss)), with the preset's batch size (32):

- eager: the model of initial_tokenizer() with build_optimizer()'s AdamW and schedule, as
  TokenizerTask builds them;
- compiled: another such model, wrapped in torch.compile (mode "default").

Each gets --warmup steps first (for compiled, the first of them compiles; its time is reported
as compile_seconds), then --repeats blocks of --steps timed steps, eager and compiled blocks
alternating. Reported: samples/s (median block) end to end like the job, and the same step on
one batch already on the GPU (no loader), the ratio compiled / eager, peak GPU memory, the card.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit, median, note, spread, tokenizer_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation included)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per variant")
    parser.add_argument(
        "--cpu-check", metavar="PRESET",
        help="no GPU: run this script's code path on the CPU with PRESET (e.g. smoke), to check the script itself",
    )
    args = parser.parse_args()

    if not torch.cuda.is_available() and not args.cpu_check:
        emit({"bench": "gpu", "skipped": "no CUDA device"})
        return

    from job.config import build_config
    from job.data.dataset import VideoDataset
    from job.data.shards import generate_dataset
    from job.models.tokenizer import initial_tokenizer
    from job.runtime.device import autocast, pick_device
    from job.training.optim import build_optimizer
    from job.training.order import epoch_order

    preset = args.cpu_check or "default"
    cfg = build_config(preset, None, ["train.device=cpu"] if args.cpu_check else [])
    device = pick_device(cfg)
    cuda = device.type == "cuda"

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    batch_size = cfg.train.batch_size
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        note(f"generating the {preset} dataset")
        generate_dataset(cfg.data, Path(tmp))
        dataset = VideoDataset(Path(tmp), cfg.data)
        generate_seconds = time.perf_counter() - started
        train = dataset.split("train")
        order = train[epoch_order(cfg.seed, 0, len(train))]
        cursor = {"eager": 0, "compiled": 0}

        def next_batch(which: str) -> torch.Tensor:
            start = cursor[which] % (len(order) - batch_size)
            cursor[which] += batch_size
            videos, _ = dataset.get(order[start : start + batch_size])
            return videos.to(device, non_blocking=True)

        variants = {}
        for which in ("eager", "compiled"):
            model = initial_tokenizer(cfg).to(device)
            optimizer, scheduler = build_optimizer(model, cfg, 100_000)
            forward = torch.compile(model) if which == "compiled" else model
            # the job's precision: bf16 autocast on CUDA when train.bf16, float32 otherwise
            variants[which] = (model, forward, optimizer, scheduler, autocast(device, cfg))

        def step(which: str, videos: torch.Tensor) -> float:
            model, forward, optimizer, scheduler, precision = variants[which]
            return tokenizer_step(model, optimizer, scheduler, videos, cfg, precision, forward)  # the job's own step

        def block(which: str, steps: int, loader: bool) -> float:
            """Samples/s over ``steps`` steps."""
            fixed = next_batch(which)
            synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(which, next_batch(which) if loader else fixed)
            synchronize()
            return steps * batch_size / (time.perf_counter() - t0)

        result: dict = {"bench": "gpu", "preset": preset, "batch_size": batch_size, "bf16": cuda and cfg.train.bf16}
        if not cuda:
            result["cpu_check"] = "the script's code path on the CPU, not a GPU measurement"
        errors: dict[str, str] = {}
        warm: dict[str, float] = {}
        for which in ("eager", "compiled"):
            note(f"{which}: {args.warmup} warm-up steps")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                t0 = time.perf_counter()
                step(which, next_batch(which))
                synchronize()
                warm[f"{which}_first_step_seconds"] = round(time.perf_counter() - t0, 2)
                for _ in range(args.warmup - 1):
                    step(which, next_batch(which))
                synchronize()
            except Exception as exc:  # a compile failure is a result too
                errors[which] = f"{type(exc).__name__}: {exc}"[:500]
            if cuda:
                result[f"{which}_peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

        rates: dict[str, list[float]] = {f"{w}_{kind}": [] for w in variants for kind in ("job", "step_only")}
        for k in range(args.repeats):
            for which in ("eager", "compiled") if k % 2 == 0 else ("compiled", "eager"):
                if which in errors:
                    continue
                note(f"{which}: block {k + 1}/{args.repeats}")
                rates[f"{which}_job"].append(block(which, args.steps, loader=True))
                rates[f"{which}_step_only"].append(block(which, args.steps, loader=False))

    for key, values in rates.items():
        if values:
            result[f"{key}_samples_per_s"] = round(median(values), 1)
            result[f"{key}_repeats"] = spread(values, 1)
    if not errors:
        result["ratio"] = round(median(rates["compiled_job"]) / median(rates["eager_job"]), 3)
        result["ratio_step_only"] = round(median(rates["compiled_step_only"]) / median(rates["eager_step_only"]), 3)
    result.update(warm)
    result["compile_seconds"] = warm.get("compiled_first_step_seconds")
    if errors:
        result["errors"] = errors
    result.update(
        {
            "card": torch.cuda.get_device_name(device) if cuda else "cpu",
            "cuda": torch.version.cuda,
            "steps_per_block": args.steps,
            "repeats": args.repeats,
            "generate_seconds": round(generate_seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
    )
    emit(result)


if __name__ == "__main__":
    sys.exit(main())
