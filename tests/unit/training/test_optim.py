"""The optimizer, the schedule and the one training step every stage takes."""

from __future__ import annotations

import pytest
import torch

from job.config import build_config
from job.training.optim import build_optimizer, optimizer_step, warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    factor = warmup_cosine(warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)
    decay = [factor(s) for s in range(4, 21)]
    assert decay == sorted(decay, reverse=True)


def test_one_step_lowers_the_loss_clips_and_advances_the_schedule():
    cfg = build_config("smoke")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps=10, lr=0.1, warmup_steps=2)
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def loss():
        return torch.nn.functional.mse_loss(model(x), y)

    first = optimizer_step(loss, model, optimizer, scheduler, grad_clip=1.0)
    assert isinstance(first, float) and scheduler.last_epoch == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # warmup: step 1 of 2
    later = [optimizer_step(loss, model, optimizer, scheduler, grad_clip=1.0) for _ in range(5)]
    assert later[-1] < first
    # Clipping: a huge loss moves the weights by at most lr * (a clipped gradient's Adam step).
    before = model.weight.detach().clone()
    optimizer_step(lambda: loss() * 1e6, model, optimizer, scheduler, grad_clip=1e-3)
    assert (model.weight - before).abs().max() < 1.0
