"""What a stage of training provides to the loop: a ``Task`` builds its model, optimizer and
schedule, takes one optimizer step on a batch, validates, and draws its picture. The loop,
the checkpointer, progress and faults do not know which model they train.

``TokenizerTask`` is stage 1: the video tokenizer (SPEC §6) on the videos of the dataset.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from job.config import Config
from job.data import VideoDataset
from job.device import autocast
from job.model import VideoTokenizer, codebook_stats, compute_loss, reconstruction_loss


class Task(Protocol):
    name: str
    identity: dict[str, Any]  # what else its checkpoints record about where its inputs came from
    dataset: VideoDataset
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def train_step(self, indices: np.ndarray) -> float: ...
    def validate(self, indices: np.ndarray, touch: Any) -> dict[str, float]: ...
    def picture(self, indices: np.ndarray, title: str) -> tuple[str, dict[str, Any]]: ...


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


def optimizer_step(model, optimizer, scheduler, videos: torch.Tensor, cfg: Config, precision=None) -> float:
    """One step of the math: forward, loss, backward, clipping, AdamW, schedule. Returns the loss
    (a host sync, which the progress log needs anyway)."""
    with precision or nullcontext():
        out = model(videos)
        loss, _ = compute_loss(out, videos, cfg.model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def initial_tokenizer(cfg: Config) -> VideoTokenizer:
    """The weights a run starts from: a pure function of the seed."""
    torch.manual_seed(cfg.seed)
    return VideoTokenizer(cfg.model, cfg.data)


def tokenizer_parameters(cfg: Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in VideoTokenizer(cfg.model, cfg.data).parameters())


class TokenizerTask:
    """Stage 1: reconstruct videos through the tokenizer's codes."""

    name = "tokenizer"
    identity: dict[str, Any] = {}

    def __init__(self, cfg: Config, dataset: VideoDataset, device: torch.device, total_steps: int, distributed: bool):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.model = initial_tokenizer(cfg).to(device)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, total_steps)
        # DDP averages gradients across ranks; saving, validating and plotting use the bare model.
        self.train_model = DistributedDataParallel(self.model) if distributed else self.model
        self.precision = autocast(device, cfg)

    def train_step(self, indices: np.ndarray) -> float:
        videos, _ = self.dataset.get(indices)
        videos = videos.to(self.device, non_blocking=True)
        return optimizer_step(self.train_model, self.optimizer, self.scheduler, videos, self.cfg, self.precision)

    @torch.no_grad()
    def validate(self, indices: np.ndarray, touch) -> dict[str, float]:
        """Loss, MSE and codebook statistics on ``indices``; ``touch()`` after each batch tells
        the watchdog that validation is alive."""
        cfg, batch_size = self.cfg, self.cfg.train.batch_size
        self.model.eval()
        losses, mses, codes = [], [], []
        for start in range(0, len(indices), batch_size):
            videos, _ = self.dataset.get(indices[start : start + batch_size])
            videos = videos.to(self.device)
            with self.precision:
                out = self.model(videos)
            touch()
            recon = out.recon.float()
            losses.append(float(reconstruction_loss(recon, videos, cfg.model)) * len(videos))
            mses.append(float(torch.mean((recon - videos) ** 2)) * len(videos))
            codes.append(out.codes.cpu())
        self.model.train()
        stats = codebook_stats(torch.cat(codes), self.model.codebook_size)
        n = len(indices)
        return {
            "val_loss": sum(losses) / n,
            "val_mse": sum(mses) / n,
            "codebook_usage": stats["usage"],
            "codebook_perplexity": stats["perplexity"],
        }

    @torch.no_grad()
    def picture(self, indices: np.ndarray, title: str) -> tuple[str, dict[str, Any]]:
        """A plot (a job.plots renderer and its arguments): the first frame of each video, as the
        model now reconstructs it."""
        classes = self.cfg.data.classes
        videos, labels = self.dataset.get(indices)
        self.model.eval()
        with self.precision:
            recon = self.model(videos.to(self.device)).recon.float().cpu()
        self.model.train()
        return "reconstruction_grid", {
            "originals": videos[:, 0].numpy(), "reconstructions": recon[:, 0].numpy(),
            "labels": [classes[int(i)] for i in labels], "title": title,
        }
