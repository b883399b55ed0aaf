"""Stage 1's task: the video tokenizer learns to reconstruct the videos of the train split
through its codes (docs/model-and-data.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from job.config import Config
from job.data.dataset import VideoDataset
from job.models.tokenizer import codebook_stats, compute_loss, initial_tokenizer, reconstruction_loss


class TokenizerTask:
    """Reconstruct videos through the tokenizer's codes."""

    def __init__(self, cfg: Config, dataset: VideoDataset, device: torch.device):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.model = initial_tokenizer(cfg).to(device)

    def loss(self, model: torch.nn.Module, indices: np.ndarray) -> torch.Tensor:
        """The training loss of a batch; ``model`` is this task's model or its DDP wrapper."""
        videos, _ = self.dataset.get(indices)
        videos = videos.to(self.device, non_blocking=True)
        return compute_loss(model(videos), videos, self.cfg.model)[0]

    @torch.no_grad()
    def validate(self, indices: np.ndarray, touch) -> dict[str, float]:
        """Loss, MSE and codebook statistics on ``indices``; ``touch()`` after each batch tells
        the watchdog that validation is alive."""
        cfg, batch_size = self.cfg, self.cfg.train.batch_size
        losses, mses, codes = [], [], []
        for start in range(0, len(indices), batch_size):
            videos, _ = self.dataset.get(indices[start : start + batch_size])
            videos = videos.to(self.device)
            out = self.model(videos)
            touch()
            recon = out.recon.float()
            losses.append(float(reconstruction_loss(recon, videos, cfg.model)) * len(videos))
            mses.append(float(torch.mean((recon - videos) ** 2)) * len(videos))
            codes.append(out.codes.cpu())
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
        """A plot (a job.plots.charts renderer and its arguments): the first frame of each video,
        as the model now reconstructs it."""
        classes = self.cfg.data.classes
        videos, labels = self.dataset.get(indices)
        recon = self.model(videos.to(self.device)).recon.float().cpu()
        return "reconstruction_grid", {
            "originals": videos[:, 0].numpy(), "reconstructions": recon[:, 0].numpy(),
            "labels": [classes[int(i)] for i in labels], "title": title,
        }
