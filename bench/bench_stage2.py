"""Stage 2 (the masked token transformer) on CPU: its training speed and its sampling speed, each
against a baseline measured in the same process. One JSON line per preset.

    python bench/bench_stage2.py [--presets small,smoke] [--repeats N] [--steps N]

- training: the job's stage-2 step (TransformerTask.loss through optimizer_step: MaskGIT masking, forward,
  cross-entropy, backward, clip, AdamW, schedule) on the preset's stage-2 batch size, in
  samples/s, against the tokenizer's step (stage 1) on its batch size in the same process:
  the ratio says what stage 2 costs per sample relative to stage 1.
- sampling: `generate` (MaskGIT decoding, `stage2.sample_steps` rounds) of one video per class,
  then the tokenizer's decode, in videos/s; against one forward pass of the transformer on the
  same batch: the ratio is the cost of a sampled video in forward passes (ideally about
  sample_steps).
- memory: the process's peak RSS (ru_maxrss) after the measurements.

The weights are the initial ones (speed does not depend on training); the data are the preset's
dataset generated into a temporary folder. Measurements alternate, --repeats times; medians.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from common import emit, median, note, spread

from job.checkpoints.format import RNGState
from job.checkpoints.manager import FINAL, CheckpointManager
from job.checkpoints.reader import CheckpointReader
from job.checkpoints.train_state import TrainState
from job.config import build_config
from job.data.dataset import VideoDataset
from job.data.shards import generate_dataset
from job.runtime.device import pick_device
from job.storage import Layout, RunStore
from job.training.optim import build_optimizer, optimizer_step
from job.training.tasks.tokenizer import TokenizerTask
from job.training.tasks.transformer import TransformerTask


def timed(work, count: int) -> float:
    """``count`` units of ``work()``'s output per second."""
    started = time.perf_counter()
    work()
    return count / (time.perf_counter() - started)


def initial_tokenizer_checkpoint(cfg, task: TokenizerTask, folder: Path):
    """The untrained tokenizer as a committed checkpoint, which is what TransformerTask reads."""
    store = RunStore(str(folder))
    optimizer, scheduler = build_optimizer(task.model, cfg, 10_000)
    parts = {"model": task.model, "optimizer": optimizer, "scheduler": scheduler, "rng": RNGState(), "train": TrainState()}
    manager = CheckpointManager(store, Layout.tokenizer, cfg.checkpoint, parts, extra={"config": cfg.to_dict()},
                                inventory={})
    manager.save(FINAL)
    manager.close()
    return CheckpointReader(store).load_newest_valid()


def job_step(task, cfg, lr=None, warmup_steps=None):
    """The job's training step for a task: its loss, then job.training.optim.optimizer_step."""
    optimizer, scheduler = build_optimizer(task.model, cfg, 10_000, lr, warmup_steps)
    return lambda indices: optimizer_step(lambda: task.loss(task.model, indices), task.model, optimizer, scheduler,
                                          cfg.optim.grad_clip)


def bench_preset(preset: str, work: Path, repeats: int, steps: int) -> None:
    cfg = build_config(preset)
    device = pick_device(cfg)
    generate_dataset(cfg.data, work / preset / "data")
    dataset = VideoDataset(work / preset / "data", cfg.data)
    train = dataset.split("train")
    tokenizer_task = TokenizerTask(cfg, dataset, device)
    checkpoint = initial_tokenizer_checkpoint(cfg, tokenizer_task, work / preset / "run")
    task = TransformerTask(cfg, dataset, device, checkpoint)
    tokenizer_step, transformer_step = job_step(tokenizer_task, cfg), job_step(task, cfg, cfg.stage2.lr, cfg.stage2.warmup_steps)
    model = task.model
    classes = torch.arange(len(cfg.data.classes), device=device)
    generator = torch.Generator().manual_seed(0)
    s1_batch, s2_batch = cfg.train.batch_size, cfg.stage2.batch_size

    def tokenizer_steps() -> None:
        for i in range(steps):
            tokenizer_step(train[i * s1_batch % len(train):][:s1_batch])

    def transformer_steps() -> None:
        for i in range(steps):
            transformer_step(train[i * s2_batch % len(train):][:s2_batch])

    def sample() -> None:
        with torch.no_grad():
            task.tokenizer.decode(model.generate(classes, generator=generator))

    def forward() -> None:
        with torch.no_grad():
            tokens = torch.full((len(classes), model.length), model.mask_id, dtype=torch.long, device=device)
            model(tokens, classes)

    rates: dict[str, list[float]] = {"tokenizer": [], "transformer": [], "sample": [], "forward": []}
    transformer_steps()  # warm-up: first calls allocate
    sample()
    for _ in range(repeats):
        rates["tokenizer"].append(timed(tokenizer_steps, steps * s1_batch))
        rates["transformer"].append(timed(transformer_steps, steps * s2_batch))
        model.eval()
        rates["sample"].append(timed(sample, len(classes)))
        rates["forward"].append(timed(forward, len(classes)))
        model.train()
    medians = {k: median(v) for k, v in rates.items()}
    emit({
        "bench": "stage2",
        "preset": preset,
        "latent_shape": list(task.tokenizer.latent_shape()),
        "tokens_per_video": model.length,
        "transformer_parameters": sum(p.numel() for p in model.parameters()),
        "train_samples_per_second": round(medians["transformer"], 2),
        "tokenizer_train_samples_per_second": round(medians["tokenizer"], 2),
        "train_ratio_vs_tokenizer": round(medians["transformer"] / medians["tokenizer"], 3),
        "sample_steps": cfg.stage2.sample_steps,
        "sample_videos_per_second": round(medians["sample"], 3),
        "sample_cost_in_forward_passes": round(medians["forward"] / medians["sample"], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "repeats": {k: spread(v) for k, v in rates.items()},
    }, torch_threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="smoke,small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            note(f"stage 2 on {preset}")
            bench_preset(preset, Path(tmp), args.repeats, args.steps)


if __name__ == "__main__":
    main()
