"""How long the training thread pauses per checkpoint, against the time to copy the state.

For the `default` model and for a model of at least 100 MB (the `default` model widened), with
AdamW state populated by one step: the blocking part of ``CheckpointManager.save`` (a host
copy of weights, optimizer, RNG and train state) against a bare ``clone()`` of the same tensors
measured in the same run, plus the background commit (serialize, sha256, atomic writes, prune)
that the training thread no longer waits for. Prints one JSON line per model.

    python bench/bench_checkpoint.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from structlog.testing import capture_logs

from job.checkpoints.format import RNGState
from job.checkpoints.manager import CheckpointManager
from job.checkpoints.train_state import TrainState
from job.config import build_config
from job.models.tokenizer import initial_tokenizer
from job.storage import Layout, RunStore
from job.training.optim import build_optimizer


def populated(cfg):
    """Model, optimizer and schedule after one step, so AdamW holds its two moments."""
    model = initial_tokenizer(cfg)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps=100)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def clone_state(model, optimizer) -> None:
    """The floor: copying every tensor a checkpoint holds."""
    _ = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _ = [v.clone() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


def measure(name: str, cfg, repeats: int) -> dict:
    model, optimizer, scheduler = populated(cfg)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                       if torch.is_tensor(v))
    copies, blocks, commits = [], [], []
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": RNGState(), "train": TrainState()}
    # The manager logs through structlog; captured here, so that stdout holds only the JSON
    # results, and read back for the commit's own duration (its "checkpoint.saved" seconds).
    with tempfile.TemporaryDirectory() as tmp, capture_logs() as logs:
        cadence = dataclasses.replace(cfg.checkpoint, keep_last=2)
        manager = CheckpointManager(
            RunStore(tmp), stage=Layout.tokenizer, cadence=cadence, parts=parts, extra={"config": cfg.to_dict()},
            inventory={},  # an empty run folder
        )
        try:
            for step in range(1, repeats + 1):
                started = time.perf_counter()
                clone_state(model, optimizer)
                copies.append(time.perf_counter() - started)

                manager.state.step = step  # the checkpoint's name and step
                started = time.perf_counter()
                saved_as = manager.save("steps")
                blocks.append(time.perf_counter() - started)
                manager.wait()
                saved = [e for e in logs if e["event"] == "checkpoint.saved" and e["checkpoint"] == saved_as]
                commits.append(saved[-1]["seconds"])
        finally:
            manager.close()
    copy, block, commit = (statistics.median(x) for x in (copies, blocks, commits))
    return {
        "bench": "checkpoint_blocking",
        "model": name,
        "state_mb": round(state_bytes / 2**20, 1),
        "blocking_ms": round(1000 * block, 2),
        "copy_to_host_ms": round(1000 * copy, 2),
        "ratio_blocking_vs_copy": round(block / copy, 2),
        "background_commit_ms": round(1000 * commit, 1),
        "ratio_blocking_vs_synchronous": round(block / (block + commit), 3),
        "target_blocking_ms": 50 if name == "default" else None,
        "repeats": repeats,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": platform.processor()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    default = build_config("default")
    # Widened until weights + two AdamW moments pass 100 MB.
    large = build_config("default", None, ["model.channels=192"])
    for name, cfg in (("default", default), ("large", large)):
        print(json.dumps(measure(name, cfg, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
