"""The stages of a run, as data: the tokenizer, then the masked token transformer over its codes.

A ``Stage`` says everything the shared code needs to know of one: where its files live, which
config keys set its schedule, which config sections a resume may not change, which earlier
stage it learns from, and how to build its task and rebuild and probe its model. The loop,
verify and startup iterate over ``stages_of(cfg)`` and never ask which stage they have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from job.checkpoints.reader import Checkpoint
from job.config import MATH_SECTIONS, STAGE2_MATH_SECTIONS, Config, get_value, steps_per_epoch
from job.data.dataset import VideoDataset
from job.models.tokenizer import VideoTokenizer, initial_tokenizer, trained_tokenizer
from job.models.transformer import initial_transformer, masked_accuracy, trained_transformer
from job.storage import Layout
from job.storage.layout import StageLayout
from job.training.tasks.tokenizer import TokenizerTask
from job.training.tasks.transformer import TransformerTask


class Task(Protocol):
    """What a stage trains: its model, the loss of a batch, its validation and its picture. The
    Trainer owns the step (optimizer, schedule, clipping, DDP, autocast, eval mode)."""

    model: torch.nn.Module

    def loss(self, model: torch.nn.Module, indices: np.ndarray) -> torch.Tensor: ...
    def validate(self, indices: np.ndarray, touch: Callable[[], None]) -> dict[str, float]: ...
    def picture(self, indices: np.ndarray, title: str) -> tuple[str, dict[str, Any]]: ...


@dataclass(frozen=True)
class TaskInputs:
    cfg: Config
    dataset: VideoDataset
    device: torch.device
    source: Checkpoint | None  # the checkpoint of the stage it learns from, if any
    touch: Callable[[], None]  # tells the watchdog that a long preparation is alive


class CheckFailed(Exception):
    """A verify check found a fault; the message is the detail a person reads."""


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    layout: StageLayout
    # The dotted config keys of its schedule.
    epochs_key: str
    batch_size_key: str
    lr_key: str
    warmup_steps_key: str
    math_sections: tuple[str, ...]  # config sections whose change a resume refuses
    order_stream: tuple[int, ...]  # keeps each stage's batch order its own (see epoch_order)
    optional: bool  # a run may skip it (0 epochs), and verify passes a run that has not reached it
    learns_from: Stage | None  # the stage whose best checkpoint's model it learns from
    build_task: Callable[[TaskInputs], Task]
    # Its model, from the seed or from saved weights; ``source`` is the learns_from stage's model.
    initial_model: Callable[[Config, torch.nn.Module | None], torch.nn.Module]
    trained_model: Callable[[dict[str, torch.Tensor], Config, torch.nn.Module | None], torch.nn.Module]
    # verify's forward check: validation videos through the rebuilt model; a sentence on success.
    forward_check: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.nn.Module | None], str]

    def epochs(self, cfg: Config) -> int:
        return get_value(cfg, self.epochs_key)

    def batch_size(self, cfg: Config) -> int:
        return get_value(cfg, self.batch_size_key)

    def steps_per_epoch(self, cfg: Config) -> int:
        return steps_per_epoch(cfg, self.batch_size(cfg))

    def total_steps(self, cfg: Config) -> int:
        return self.steps_per_epoch(cfg) * self.epochs(cfg)


def stages_of(cfg: Config) -> list[Stage]:
    """The stages this config trains, in order."""
    return [stage for stage in STAGES if not stage.optional or stage.epochs(cfg) > 0]


def stage_numbered(number: int) -> Stage:
    return STAGES[number - 1]


# --- the tokenizer -----------------------------------------------------------------------------


def _tokenizer_forward(model: VideoTokenizer, videos: torch.Tensor, _labels: torch.Tensor, _source: Any) -> str:
    codes = model.encode(videos)
    recon = model.decode(codes)
    expected_codes = (len(videos), *model.latent_shape())
    if codes.is_floating_point() or codes.dtype == torch.bool or tuple(codes.shape) != expected_codes:
        raise CheckFailed(f"codes {codes.dtype}{tuple(codes.shape)}, expected integers of shape {expected_codes}")
    if int(codes.min()) < 0 or int(codes.max()) >= model.codebook_size:
        span = f"{int(codes.min())}..{int(codes.max())}"
        raise CheckFailed(f"codes span {span}, outside 0..{model.codebook_size - 1}")
    if recon.shape != videos.shape:
        raise CheckFailed(f"reconstruction {tuple(recon.shape)}, input {tuple(videos.shape)}")
    if not torch.isfinite(recon).all():
        raise CheckFailed("the reconstruction holds NaN or infinite values")
    mse = float(torch.mean((recon - videos) ** 2))
    return f"{len(videos)} validation videos -> codes {expected_codes} in range -> finite video; MSE {mse:.5f}"


TOKENIZER = Stage(
    number=1, name="tokenizer", layout=Layout.tokenizer,
    epochs_key="train.epochs", batch_size_key="train.batch_size", lr_key="optim.lr",
    warmup_steps_key="optim.warmup_steps", math_sections=MATH_SECTIONS, order_stream=(), optional=False,
    learns_from=None,
    build_task=lambda inputs: TokenizerTask(inputs.cfg, inputs.dataset, inputs.device),
    initial_model=lambda cfg, _source: initial_tokenizer(cfg),
    trained_model=lambda weights, cfg, _source: trained_tokenizer(weights, cfg.model, cfg.data),
    forward_check=_tokenizer_forward,
)


# --- the transformer ---------------------------------------------------------------------------


def _transformer_forward(model, videos: torch.Tensor, labels: torch.Tensor, tokenizer: VideoTokenizer) -> str:
    batch = model.mask_for_training(tokenizer.encode(videos), labels, generator=torch.Generator().manual_seed(0))
    logits = model(batch.tokens, batch.classes)
    expected = (len(videos), model.length, model.codebook_size)
    if tuple(logits.shape) != expected:
        raise CheckFailed(f"logits of shape {tuple(logits.shape)}, expected {expected}")
    if not torch.isfinite(logits).all():
        raise CheckFailed("the logits hold NaN or infinite values")
    accuracy = float(masked_accuracy(logits[batch.masked], batch))
    return f"{len(videos)} validation videos -> codes -> finite logits {expected}; masked-token accuracy {accuracy:.3f}"


TRANSFORMER = Stage(
    number=2, name="transformer", layout=Layout.transformer,
    epochs_key="stage2.epochs", batch_size_key="stage2.batch_size", lr_key="stage2.lr",
    warmup_steps_key="stage2.warmup_steps", math_sections=STAGE2_MATH_SECTIONS, order_stream=(2,), optional=True,
    learns_from=TOKENIZER,
    build_task=lambda inputs: TransformerTask(inputs.cfg, inputs.dataset, inputs.device, inputs.source, inputs.touch),
    initial_model=initial_transformer,
    trained_model=lambda weights, cfg, tokenizer: trained_transformer(weights, cfg, tokenizer),
    forward_check=_transformer_forward,
)

STAGES = (TOKENIZER, TRANSFORMER)
