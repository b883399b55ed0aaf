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
from job.inference.load import VideoModels
from job.inference.videos import encode_all, object_cells_all, predict_videos
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
        # The background's code: the most common one among the train split's tokens.
        self.common_code = int(torch.bincount(self.codes[dataset.split("train")].flatten()).argmax())
        # What validation measures the model against: the object's cells of the val videos, and the
        # most common code at each position of the train split (a lookup table that knows no context).
        val = dataset.split("val")
        self.objects = torch.zeros_like(self.codes, dtype=torch.bool)  # filled for the val split only
        self.objects[val] = object_cells_all(self.tokenizer, dataset, val, cfg.train.batch_size,
                                             cfg.model.foreground_threshold)
        self.lookup = most_common_codes(self.codes[dataset.split("train")].flatten(1), self.tokenizer.codebook_size)
        log.info("stage2.codes", videos=int(sum(len(dataset.split(s)) for s in ("train", "val"))),
                 latent_shape=list(self.tokenizer.latent_shape()), tokenizer=tokenizer_checkpoint.name)
        self.model = initial_transformer(cfg, self.tokenizer).to(device)

    def loss(self, model: torch.nn.Module, indices: np.ndarray) -> torch.Tensor:
        """The masked-token loss of a batch, with masks drawn from torch's global generator (which
        every checkpoint saves); ``model`` is this task's model or its DDP wrapper."""
        batch = self._on_device(self.model.mask_for_training(self.codes[indices], self.labels[indices]))
        logits = model(batch.tokens, batch.classes)
        return masked_token_loss(logits, batch, self.common_code, self.cfg.stage2.object_weight)[0]

    def _on_device(self, batch: MaskedBatch) -> MaskedBatch:
        return MaskedBatch(*(t.to(self.device) for t in (batch.tokens, batch.classes, batch.targets, batch.masked)))

    @torch.no_grad()
    def validate(self, indices: np.ndarray, touch) -> dict[str, float | None]:
        """Masked-token loss and accuracy on ``indices``, with masks from a fixed generator so that
        epochs are compared on the same masks (and training's random stream is untouched); and
        what the headline accuracy hides: the accuracy on the object's tokens, the accuracy over
        the per-position lookup table's on the same tokens, and how much the true class lowers
        the loss against a wrong one."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        sums: dict[str, float] = dict.fromkeys(
            ("loss", "accuracy", "hits", "lookup_hits", "masked", "object_hits", "objects", "class_effect"), 0.0)
        batch_size, classes = self.cfg.stage2.batch_size, self.model.num_classes
        lookup = self.lookup.to(self.device)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = self._on_device(self.model.mask_for_training(self.codes[chunk], self.labels[chunk], generator=generator))
            logits = self.model(batch.tokens, batch.classes)
            loss, accuracy = masked_token_loss(logits, batch)
            sums["loss"] += float(loss) * len(chunk)
            sums["accuracy"] += float(accuracy) * len(chunk)
            right = logits.argmax(-1) == batch.targets
            objects = self.objects[chunk].flatten(1).to(self.device) & batch.masked
            sums["hits"] += float(right[batch.masked].sum())
            sums["lookup_hits"] += float((lookup[None] == batch.targets)[batch.masked].sum())
            sums["masked"] += float(batch.masked.sum())
            sums["object_hits"] += float(right[objects].sum())
            sums["objects"] += float(objects.sum())
            labels = self.labels[chunk].to(self.device)
            true_class = masked_token_loss(self.model(batch.tokens, labels), batch)[0]
            wrong_class = masked_token_loss(self.model(batch.tokens, (labels + 1) % classes), batch)[0]
            sums["class_effect"] += float(wrong_class - true_class) * len(chunk)
            touch()
        n = len(indices)
        return {
            "val_loss": sums["loss"] / n,
            "val_accuracy": sums["accuracy"] / n,
            "val_object_accuracy": sums["object_hits"] / sums["objects"] if sums["objects"] else None,
            "val_lookup_accuracy": sums["lookup_hits"] / sums["masked"],
            "val_gain_over_lookup": (sums["hits"] - sums["lookup_hits"]) / sums["masked"],
            "val_class_effect_nats": sums["class_effect"] / n,
        }

    @torch.no_grad()
    def picture(self, indices: np.ndarray, title: str) -> tuple[str, dict[str, Any]]:
        """Frame prediction on one validation video per class, as `predict` makes it: the first
        latent frames' codes given (encoded without the frames after them), the rest decoded."""
        videos, labels = self.dataset.get(indices)
        generator = torch.Generator().manual_seed(self.cfg.stage2.sample_seed)
        s2 = self.cfg.stage2
        models = VideoModels(self.tokenizer, self.model, self.device)
        predicted = predict_videos(models, videos, s2.sample_steps, s2.temperature, generator)
        classes = self.cfg.data.classes
        return "reconstruction_grid", {
            "originals": videos[:, 0].numpy(), "reconstructions": predicted.numpy(),
            "labels": [classes[int(i)] for i in labels], "title": title,
        }


def most_common_codes(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(L,) the most common code at each position of ``codes`` (N, L); ties go to the lowest code."""
    counts = torch.zeros((codes.shape[1], codebook_size), dtype=torch.long)
    counts.scatter_add_(1, codes.T.contiguous(), torch.ones_like(codes.T))
    return counts.argmax(1)
