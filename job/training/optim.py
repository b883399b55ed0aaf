"""The optimizer, learning-rate schedule and step of every stage: AdamW, linear warmup then cosine
decay, gradient clipping."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import ContextManager

import torch

from job.config import Config


def build_optimizer(model: torch.nn.Module, cfg: Config, total_steps: int, lr: float | None = None,
                    warmup_steps: int | None = None):
    """AdamW with linear warmup then cosine decay; ``lr`` and ``warmup_steps`` default to the
    ``optim`` section's (stage 2 has its own)."""
    o = cfg.optim
    lr = o.lr if lr is None else lr
    warmup_steps = o.warmup_steps if warmup_steps is None else warmup_steps
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
        foreach=False,  # the same kernels on every attempt; foreach is a speed detail we do not need on CPU
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, o.min_lr_ratio))
    return optimizer, scheduler


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup to the base rate, then cosine decay to ``min_ratio`` of it at the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_step(
    loss_of: Callable[[], torch.Tensor], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, grad_clip: float, precision: ContextManager | None = None,
) -> float:
    """One step of the math: the loss (under ``precision``, the run's autocast), backward,
    clipping, AdamW, the schedule. Returns the loss (a host sync, which the progress log needs
    anyway). The one place a training step is written: every stage's Trainer and the benches
    call it."""
    with precision or nullcontext():
        loss = loss_of()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())
