"""Stage 2's task: the masked token transformer learns the codes that the frozen tokenizer gives
the train split (docs/generation.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F

from job.checkpoints.reader import Checkpoint
from job.config import Config
from job.data.dataset import VideoDataset
from job.inference.load import VideoModels
from job.inference.videos import encode_all, given_video_frames, object_cells_all, predict_videos
from job.models.tokenizer import background_code, trained_tokenizer
from job.models.transformer import MaskedBatch, initial_transformer, masked_token_loss

log = structlog.get_logger("job.stage2")


class TransformerTask:
    """Stage 2: predict masked codes of the train split's videos (MaskGIT)."""

    def __init__(self, cfg: Config, dataset: VideoDataset, device: torch.device, tokenizer_checkpoint: Checkpoint,
                 touch=lambda: None):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.tokenizer = trained_tokenizer(tokenizer_checkpoint.model, cfg.model, cfg.data, device)
        self.model = initial_transformer(cfg, self.tokenizer).to(device)
        # Codes of every train and val video, once per attempt: the tokenizer is frozen, and the
        # same weights give the same codes, so a resumed attempt trains on the same numbers. Beside
        # them, what the prediction task is given: the codes `predict` gives, of the videos black
        # after the given frames (a tokenizer that sees neighbouring frames codes their end otherwise).
        given_frames = given_video_frames(VideoModels(self.tokenizer, self.model, device))
        self.codes = torch.zeros((dataset.num_samples, *self.tokenizer.latent_shape()), dtype=torch.long)
        self.given_codes = torch.zeros_like(self.codes)
        for split in ("train", "val"):
            indices = dataset.split(split)
            self.codes[indices] = encode_all(self.tokenizer, dataset, indices, cfg.train.batch_size, device, touch)
            self.given_codes[indices] = encode_all(self.tokenizer, dataset, indices, cfg.train.batch_size, device,
                                                   touch, blank_from=given_frames)
        self.labels = torch.from_numpy(dataset.labels)
        self.common_code = background_code(self.codes[dataset.split("train")])
        # What validation measures the model against: the object's cells of the val videos, and the
        # most common code at each position of the train split (a lookup table that knows no context).
        val = dataset.split("val")
        self.objects = torch.zeros_like(self.codes, dtype=torch.bool)  # filled for the val split only
        self.objects[val] = object_cells_all(self.tokenizer, dataset, val, cfg.train.batch_size,
                                             cfg.model.foreground_threshold)
        self.lookup = most_common_codes(self.codes[dataset.split("train")].flatten(1), self.tokenizer.codebook_size)
        log.info("stage2.codes", videos=int(sum(len(dataset.split(s)) for s in ("train", "val"))),
                 latent_shape=list(self.tokenizer.latent_shape()), tokenizer=tokenizer_checkpoint.name)

    def loss(self, model: torch.nn.Module, indices: np.ndarray) -> torch.Tensor:
        """The masked-token loss of a batch, with masks drawn from torch's global generator (which
        every checkpoint saves); ``model`` is this task's model or its DDP wrapper."""
        batch = self._on_device(
            self.model.mask_for_training(self.codes[indices], self.labels[indices], self.given_codes[indices])
        )
        logits = model(batch.tokens, batch.classes, at=batch.masked)
        return masked_token_loss(logits, batch, self.common_code, self.cfg.stage2.object_weight)

    def _on_device(self, batch: MaskedBatch) -> MaskedBatch:
        return MaskedBatch(*(t.to(self.device) for t in (batch.tokens, batch.classes, batch.targets, batch.masked)))

    @torch.no_grad()
    def validate(self, indices: np.ndarray, touch) -> dict[str, float | None]:
        """Stage 2's health on ``indices`` (``health_metrics``), with masks from a fixed generator so
        that epochs are compared on the same masks (and training's random stream is untouched)."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        sums: dict[str, float] = {}
        lookup = self.lookup.to(self.device)
        for start in range(0, len(indices), self.cfg.stage2.batch_size):
            chunk = indices[start : start + self.cfg.stage2.batch_size]
            batch = self._on_device(self.model.mask_for_training(
                self.codes[chunk], self.labels[chunk], self.given_codes[chunk], generator=generator))
            objects = self.objects[chunk].flatten(1).to(self.device)
            labels = self.labels[chunk].to(self.device)
            for key, value in health_sums(self.model, batch, objects, labels, lookup, self.model.num_classes).items():
                sums[key] = sums.get(key, 0.0) + value
            touch()
        return health_metrics(sums, len(indices))

    @torch.no_grad()
    def picture(self, indices: np.ndarray, title: str) -> tuple[str, dict[str, Any]]:
        """Frame prediction on one validation video per class, as `predict` makes it: the first
        latent frames' codes given (encoded without the frames after them), the rest decoded."""
        videos, labels = self.dataset.get(indices)
        generator = torch.Generator().manual_seed(self.cfg.stage2.sample_seed)
        models = VideoModels(self.tokenizer, self.model, self.device)
        predicted = predict_videos(models, videos, generator)
        classes = self.cfg.data.classes
        return "reconstruction_grid", {
            "originals": videos[:, 0].numpy(), "reconstructions": predicted.numpy(),
            "labels": [classes[int(i)] for i in labels], "title": title,
        }


def health_sums(model, batch: MaskedBatch, objects: torch.Tensor, labels: torch.Tensor, lookup: torch.Tensor,
                num_classes: int) -> dict[str, float]:
    """One validation batch's sums for ``health_metrics``. ``model(tokens, classes, at=...)`` gives
    logits; ``objects`` (B, L) marks the tokens on the object's cells, ``lookup`` (L,) the most
    common code at each position."""
    masked, truth = batch.masked, batch.targets[batch.masked]

    per_video = masked.sum(1)

    def losses(classes: torch.Tensor, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and hit per masked token of ``videos`` (a bool per video), in ``masked``'s order."""
        logits = model(batch.tokens[videos], classes[videos], at=masked[videos]).float()
        wanted = truth[videos.repeat_interleave(per_video)]
        return F.cross_entropy(logits, wanted, reduction="none"), logits.argmax(-1) == wanted

    every = torch.ones_like(labels, dtype=torch.bool)
    loss, right = losses(batch.classes, every)
    on_object = objects[masked]
    # Under the true class, a sample whose task gave it its class has the loss just computed.
    true_class, unconditioned = loss.clone(), batch.classes != labels
    if bool(unconditioned.any()):
        true_class[unconditioned.repeat_interleave(per_video)] = losses(labels, unconditioned)[0]
    effect = losses((labels + 1) % num_classes, every)[0] - true_class  # a wrong class against the true one
    videos = len(labels)
    return {
        "loss": float(loss.mean()) * videos,
        "accuracy": float(right.float().mean()) * videos,
        "hits": float(right.sum()),
        "lookup_hits": float((lookup.expand_as(masked)[masked] == truth).sum()),
        "masked": float(masked.sum()),
        "object_hits": float(right[on_object].sum()),
        "object_loss": float(loss[on_object].sum()),
        "objects": float(on_object.sum()),
        "class_effect": float(effect.mean()) * videos,
        "class_effect_object": float(effect[on_object].sum()),
    }


def health_metrics(sums: dict[str, float], videos: int) -> dict[str, float | None]:
    """What the headline masked-token loss and accuracy are made of: the object's tokens (their
    loss, and their accuracy, which stays at 0 while the object's probability is shared among
    its codes), the gain over a per-position lookup table that knows no context, and the loss
    with a wrong class minus the loss with the true one, over all masked tokens (where the
    background's certain tokens dilute it) and over the object's."""
    objects = sums["objects"]
    return {
        "val_loss": sums["loss"] / videos,
        "val_accuracy": sums["accuracy"] / videos,
        "val_object_accuracy": sums["object_hits"] / objects if objects else None,
        "val_object_loss": sums["object_loss"] / objects if objects else None,
        "val_lookup_accuracy": sums["lookup_hits"] / sums["masked"],
        "val_gain_over_lookup": (sums["hits"] - sums["lookup_hits"]) / sums["masked"],
        "val_class_effect_nats": sums["class_effect"] / videos,
        "val_class_effect_object_nats": sums["class_effect_object"] / objects if objects else None,
    }


def most_common_codes(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(L,) the most common code at each position of ``codes`` (N, L); ties go to the lowest code."""
    counts = torch.zeros((codes.shape[1], codebook_size), dtype=torch.long)
    counts.scatter_add_(1, codes.T.contiguous(), torch.ones_like(codes.T))
    return counts.argmax(1)
