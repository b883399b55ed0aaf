"""The stateful parts of a smoke run in process (model, optimizer, scheduler, RNG, train state) and
a checkpoint manager over them, for the checkpoint tests (tests/unit/checkpoints/, tests/drills/)."""

from __future__ import annotations

import torch

from job.checkpoints.format import RNGState
from job.checkpoints.manager import FINAL, CheckpointManager
from job.checkpoints.reader import CheckpointReader
from job.checkpoints.train_state import TrainState
from job.config import build_config, set_value
from job.models.tokenizer import initial_tokenizer
from job.storage import Layout
from job.training.optim import build_optimizer
from tests.helpers import FakeClock

CFG = build_config("smoke")


def fresh_parts(seed: int = 0, step: int = 0) -> dict:
    model = initial_tokenizer(CFG)
    optimizer, scheduler = build_optimizer(model, CFG, total_steps=100)
    torch.manual_seed(seed)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": RNGState(), "train": TrainState(step=step)}


def manager(store, parts, keep_last: int = 2, clock=None, **cadence) -> CheckpointManager:
    cfg = build_config("smoke")
    set_value(cfg, "checkpoint.keep_last", keep_last)
    for key, value in cadence.items():
        set_value(cfg, f"checkpoint.{key}", value)
    return CheckpointManager(
        store, Layout.tokenizer, cfg.checkpoint, parts, extra={"config": CFG.to_dict()}, inventory=CheckpointReader(store).inventory(),
        clock=clock or FakeClock(),
    )


def save_at(checkpoints: CheckpointManager, step: int, reason: str = FINAL, val_loss: float | None = None) -> str:
    checkpoints.state.step = step
    name = checkpoints.save(reason, val_loss)
    checkpoints.wait()
    return name


def one_step(parts: dict, video=None) -> None:
    if video is None:
        video = torch.rand(2, 1, CFG.data.frames, CFG.data.height, CFG.data.width)
    loss = parts["model"](video).recon.mean()
    parts["optimizer"].zero_grad()
    loss.backward()
    parts["optimizer"].step()
    parts["scheduler"].step()
