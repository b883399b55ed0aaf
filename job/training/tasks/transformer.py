"""Stage 2's task: the masked token transformer learns the codes that the frozen tokenizer gives
the train split (docs/generation.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import structlog
import torch

from job.checkpoints.reader import Checkpoint
from job.config import Config
from job.data.dataset import VideoDataset
from job.inference.videos import encode_all
from job.models.tokenizer import trained_tokenizer
from job.models.transformer import MaskedBatch, initial_transformer, masked_token_loss

log = structlog.get_logger("job.stage2")


class TransformerTask:
    """Stage 2: predict masked codes of the train split's videos (MaskGIT)."""

    def __init__(self, cfg: Config, dataset: VideoDataset, device: torch.device, tokenizer_checkpoint: Checkpoint,
                 touch=lambda: None):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.tokenizer = trained_tokenizer(tokenizer_checkpoint.model, cfg.model, cfg.data, device)
        # Codes of every train and val video, once per attempt: the tokenizer is frozen, and the
        # same weights give the same codes, so a resumed attempt trains on the same numbers.
        self.codes = torch.zeros((dataset.num_samples, *self.tokenizer.latent_shape()), dtype=torch.long)
        for split in ("train", "val"):
            indices = dataset.split(split)
            self.codes[indices] = encode_all(self.tokenizer, dataset, indices, cfg.train.batch_size, device, touch)
        self.labels = torch.from_numpy(dataset.labels)
        log.info("stage2.codes", videos=int(sum(len(dataset.split(s)) for s in ("train", "val"))),
                 latent_shape=list(self.tokenizer.latent_shape()), tokenizer=tokenizer_checkpoint.name)
        self.model = initial_transformer(cfg, self.tokenizer).to(device)

    def loss(self, model: torch.nn.Module, indices: np.ndarray) -> torch.Tensor:
        """The masked-token loss of a batch, with masks drawn from torch's global generator (which
        every checkpoint saves); ``model`` is this task's model or its DDP wrapper."""
        return self._loss(model, self.model.mask_for_training(self.codes[indices], self.labels[indices]))[0]

    def _loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = MaskedBatch(*(t.to(self.device) for t in (batch.tokens, batch.classes, batch.targets, batch.masked)))
        return masked_token_loss(model(batch.tokens, batch.classes), batch)

    @torch.no_grad()
    def validate(self, indices: np.ndarray, touch) -> dict[str, float]:
        """Masked-token loss and accuracy on ``indices``, with masks from a fixed generator so
        that epochs are compared on the same masks (and training's random stream is untouched)."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        losses, accuracies, n = 0.0, 0.0, 0
        batch_size = self.cfg.stage2.batch_size
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = self.model.mask_for_training(self.codes[chunk], self.labels[chunk], generator=generator)
            loss, accuracy = self._loss(self.model, batch)
            losses += float(loss) * len(chunk)
            accuracies += float(accuracy) * len(chunk)
            n += len(chunk)
            touch()
        return {"val_loss": losses / n, "val_accuracy": accuracies / n}

    @torch.no_grad()
    def picture(self, indices: np.ndarray, title: str) -> tuple[str, dict[str, Any]]:
        """Frame prediction on one validation video per class: the first latent frames given,
        the rest decoded from the model's codes."""
        videos, labels = self.dataset.get(indices)
        given_frames = self.model.predict_frames()
        generator = torch.Generator().manual_seed(self.cfg.stage2.sample_seed)
        none = torch.full((len(indices),), self.model.num_classes, dtype=torch.long)
        codes = self.model.generate(none.to(self.device), given=self.codes[indices].to(self.device),
                                    given_frames=given_frames, generator=generator).cpu()
        predicted = self.tokenizer.decode(codes.to(self.device)).float().cpu()
        classes = self.cfg.data.classes
        return "reconstruction_grid", {
            "originals": videos[:, 0].numpy(), "reconstructions": predicted[:, 0].numpy(),
            "labels": [classes[int(i)] for i in labels], "title": title,
        }
