"""How long the training thread pauses per checkpoint, against the time to copy the state.

For the `default` model and for a model of at least 100 MB (the `default` model widened), with
AdamW state populated by one step: the blocking part of ``Checkpointer.save_async`` (a host
copy of weights, optimizer and RNG) against a bare ``clone()`` of the same tensors measured in
the same run, plus the background commit (serialize, sha256, atomic writes, prune) that the
training thread no longer waits for. Prints one JSON line per model.

    python bench/bench_checkpoint.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.checkpoint import Checkpointer  # noqa: E402
from job.config import build_config  # noqa: E402
from job.storage import RunStore  # noqa: E402
from job.train import Position, build_training, state_from  # noqa: E402


def populated(cfg):
    """Model, optimizer and schedule after one step, so AdamW holds its two moments."""
    model, optimizer, scheduler = build_training(cfg, torch.device("cpu"), total_steps=100)
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
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = Checkpointer(RunStore(tmp), keep_last=2)
        for step in range(1, repeats + 1):
            started = time.perf_counter()
            clone_state(model, optimizer)
            copies.append(time.perf_counter() - started)

            commit_seconds = []
            started = time.perf_counter()
            checkpointer.save_async(
                step, 0, model, optimizer, scheduler, state_from(Position(step=step), cfg, "steps"),
                on_commit=lambda _n, seconds, _p: commit_seconds.append(seconds),
            )
            blocks.append(time.perf_counter() - started)
            checkpointer.wait()
            commits.append(commit_seconds[0])
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
