"""Stage 2 as a ``Task`` (SPEC §15): the masked token transformer, trained on the codes that the
frozen stage-1 tokenizer gives the train split.

The tokenizer a stage-2 run learns from is the stage's identity: a stage-2 checkpoint records
the tokenizer checkpoint's name and the sha256 of its weights, and resuming over any other is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch
from torch.nn.parallel import DistributedDataParallel

from job.checkpoint import MODEL_FILE, Checkpoint, CheckpointReader
from job.config import Config, ConfigError
from job.data import VideoDataset
from job.device import autocast
from job.model import VideoTokenizer, trained_tokenizer
from job.monitoring.lifecycle import stop_point
from job.training.task import build_optimizer
from job.transformer import MaskedBatch, MaskedVideoTransformer, masked_token_loss

log = structlog.get_logger("job.stage2")


class TokenizerMismatch(ConfigError):
    """Stage-2 checkpoints learned from another tokenizer than the run's (exit 2)."""


@dataclass(frozen=True)
class TokenizerRef:
    """The stage-1 checkpoint whose codes stage 2 learns from."""

    checkpoint: str
    sha256: str

    @staticmethod
    def of(checkpoint: Checkpoint) -> "TokenizerRef":
        return TokenizerRef(checkpoint.name, checkpoint.manifest["files"][MODEL_FILE]["sha256"])

    def as_dict(self) -> dict[str, str]:
        return {"checkpoint": self.checkpoint, "sha256": self.sha256}


def stage1_tokenizer(reader: CheckpointReader, newest: Checkpoint) -> Checkpoint:
    """The tokenizer stage 2 learns from: the best stage-1 checkpoint by validation loss, as the
    finished stage records it (verified like every read)."""
    return newest if newest.best in (None, newest.name) else reader.load(newest.best)


def refuse_other_tokenizer(saved: dict[str, Any] | None, tokenizer: TokenizerRef) -> None:
    if saved != tokenizer.as_dict():
        raise TokenizerMismatch(
            f"refusing to resume stage 2: its checkpoints learned from tokenizer {saved}, but the run's tokenizer "
            f"is {tokenizer.as_dict()} (stage 1 changed); use a new --run-uri, or delete stage2/ to train stage 2 again"
        )


@torch.no_grad()
def encode_all(tokenizer: VideoTokenizer, dataset: VideoDataset, indices: np.ndarray, batch_size: int,
               device: torch.device, touch=lambda: None) -> torch.Tensor:
    """Codes (len(indices), t, h, w) of the given videos, on the CPU."""
    codes = []
    for start in range(0, len(indices), batch_size):
        stop_point("encoding videos to codes")
        videos, _ = dataset.get(indices[start : start + batch_size])
        codes.append(tokenizer.encode(videos.to(device)).cpu())
        touch()
    return torch.cat(codes)


def build_transformer(cfg: Config, tokenizer: VideoTokenizer) -> MaskedVideoTransformer:
    """The initial weights: a pure function of the seed."""
    torch.manual_seed(cfg.seed)
    return MaskedVideoTransformer(cfg.stage2, tokenizer.codebook_size, tokenizer.latent_shape(), len(cfg.data.classes))


def trained_transformer(weights: dict[str, torch.Tensor], cfg: Config, tokenizer: VideoTokenizer,
                        device: torch.device | str = "cpu") -> MaskedVideoTransformer:
    model = MaskedVideoTransformer(cfg.stage2, tokenizer.codebook_size, tokenizer.latent_shape(), len(cfg.data.classes))
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval()


class TransformerTask:
    """Stage 2: predict masked codes of the train split's videos (MaskGIT)."""

    name = "transformer"

    def __init__(self, cfg: Config, dataset: VideoDataset, device: torch.device, total_steps: int, distributed: bool,
                 tokenizer_checkpoint: Checkpoint, touch=lambda: None):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.tokenizer = trained_tokenizer(tokenizer_checkpoint.model, cfg.model, cfg.data, device)
        self.tokenizer_ref = TokenizerRef.of(tokenizer_checkpoint)
        self.identity = {"tokenizer": self.tokenizer_ref.as_dict()}
        # Codes of every train and val video, once per attempt: the tokenizer is frozen, and the
        # same weights give the same codes, so a resumed attempt trains on the same numbers.
        self.codes = torch.zeros((dataset.num_samples, *self.tokenizer.latent_shape()), dtype=torch.long)
        for split in ("train", "val"):
            indices = dataset.split(split)
            self.codes[indices] = encode_all(self.tokenizer, dataset, indices, cfg.train.batch_size, device, touch)
        self.labels = torch.from_numpy(dataset.labels)
        log.info("stage2.codes", videos=int(sum(len(dataset.split(s)) for s in ("train", "val"))),
                 latent_shape=list(self.tokenizer.latent_shape()), tokenizer=self.tokenizer_ref.as_dict())
        self.model = build_transformer(cfg, self.tokenizer).to(device)
        s2 = cfg.stage2
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, total_steps, lr=s2.lr, warmup_steps=s2.warmup_steps)
        self.train_model = DistributedDataParallel(self.model) if distributed else self.model
        self.precision = autocast(device, cfg)

    def train_step(self, indices: np.ndarray) -> float:
        batch = self.model.mask_for_training(self.codes[indices], self.labels[indices])
        with self.precision:
            loss, _ = self._loss(self.train_model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def _loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = MaskedBatch(*(t.to(self.device) for t in (batch.tokens, batch.classes, batch.targets, batch.masked)))
        return masked_token_loss(model(batch.tokens, batch.classes), batch)

    @torch.no_grad()
    def validate(self, indices: np.ndarray, touch) -> dict[str, float]:
        """Masked-token loss and accuracy on ``indices``, with masks from a fixed generator so
        that epochs are compared on the same masks (and training's random stream is untouched)."""
        self.model.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed)
        losses, accuracies, n = 0.0, 0.0, 0
        batch_size = self.cfg.stage2.batch_size
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = self.model.mask_for_training(self.codes[chunk], self.labels[chunk], generator=generator)
            with self.precision:
                loss, accuracy = self._loss(self.model, batch)
            losses += float(loss) * len(chunk)
            accuracies += float(accuracy) * len(chunk)
            n += len(chunk)
            touch()
        self.model.train()
        return {"val_loss": losses / n, "val_accuracy": accuracies / n}

    @torch.no_grad()
    def picture(self, indices: np.ndarray, title: str) -> tuple[str, dict[str, Any]]:
        """Frame prediction on one validation video per class: the first latent frames given,
        the rest decoded from the model's codes."""
        self.model.eval()
        videos, labels = self.dataset.get(indices)
        given_frames = self.model.predict_frames()
        generator = torch.Generator().manual_seed(self.cfg.stage2.sample_seed)
        none = torch.full((len(indices),), self.model.num_classes, dtype=torch.long)
        codes = self.model.generate(none.to(self.device), given=self.codes[indices].to(self.device),
                                    given_frames=given_frames, generator=generator).cpu()
        predicted = self.tokenizer.decode(codes.to(self.device)).float().cpu()
        self.model.train()
        classes = self.cfg.data.classes
        return "reconstruction_grid", {
            "originals": videos[:, 0].numpy(), "reconstructions": predicted[:, 0].numpy(),
            "labels": [classes[int(i)] for i in labels], "title": title,
        }
