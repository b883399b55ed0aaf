"""A trained model from a run folder, as the modes use it: the tokenizer's best checkpoint, or the
newest valid stage-2 checkpoint with the tokenizer checkpoint it names (verified, and checked to
be the very weights it learned from), each rebuilt from the run's own config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
import torch

from job.checkpoints.reader import Checkpoint, CheckpointError, CheckpointReader, SourceRef
from job.config import MATH_SECTIONS, SAMPLING_KEYS, Config, ConfigError, config_from_dict, diff_keys, set_value
from job.models.tokenizer import VideoTokenizer, trained_tokenizer
from job.models.transformer import MaskedVideoTransformer, trained_transformer
from job.storage import Layout, RunStore

log = structlog.get_logger("job.load")


class NoTrainedGenerator(ConfigError):
    """The run holds no usable stage-2 checkpoint (exit 2: wrong run URI, or stage 2 not trained)."""


@dataclass
class VideoModels:
    """The two stages and where they run: all that encoding, generating and predicting need
    (stage 2's training plot holds these without a checkpoint)."""

    tokenizer: VideoTokenizer
    transformer: MaskedVideoTransformer
    device: torch.device


@dataclass
class TrainedGenerator(VideoModels):
    """The two stages as a run trained them, and the checkpoints they came from."""

    cfg: Config  # the run's own config, with this machine's device choices
    checkpoint: Checkpoint
    tokenizer_checkpoint: Checkpoint

    @property
    def complete(self) -> bool:
        return self.checkpoint.state.get("reason") == "final"

    def settings(self) -> dict[str, Any]:
        """What made a set of samples or predictions: the checkpoints, and the sampling settings
        the transformer decodes with (the command line's)."""
        s2 = self.transformer.cfg
        return {
            "checkpoint": self.checkpoint.name,
            "checkpoint_step": self.checkpoint.step,
            "stage2_complete": self.complete,
            "tokenizer_checkpoint": self.tokenizer_checkpoint.name,
            "seed": s2.sample_seed,
            "steps": s2.sample_steps,
            "temperature": s2.temperature,
            "choice_temperature": s2.choice_temperature,
            "sample_frame_steps": s2.sample_frame_steps,
            "guidance": s2.guidance,
            "device": str(self.device),
        }


def load_generator(cfg: Config, store: RunStore, device: torch.device) -> TrainedGenerator:
    """Raises NoTrainedGenerator when the run has no valid stage-2 checkpoint or its tokenizer is
    missing or not the one it learned from."""
    checkpoint = CheckpointReader(store, Layout.transformer).load_newest_valid()
    if checkpoint is None:
        raise NoTrainedGenerator(
            f"{store.uri} has no valid stage-2 checkpoint under {Layout.transformer.checkpoints}/: "
            "train stage 2 first (`train` runs it after the tokenizer unless stage2.epochs is 0)"
        )
    ref = checkpoint.state.get("tokenizer") or {}
    try:
        tokenizer_checkpoint = CheckpointReader(store, Layout.tokenizer).load(str(ref.get("checkpoint")))
    except CheckpointError as exc:
        raise NoTrainedGenerator(f"stage-2 {checkpoint.name} learned from tokenizer {ref}, which is not usable: {exc}") from exc
    if SourceRef.of(tokenizer_checkpoint).sha256 != ref.get("sha256"):
        raise NoTrainedGenerator(f"stage-2 {checkpoint.name} learned from tokenizer {ref}, but those weights have changed")
    run_cfg = evaluation_config(checkpoint, cfg)
    for key in SAMPLING_KEYS:  # how to draw is the command line's; what was trained, the run's
        setattr(run_cfg.stage2, key, getattr(cfg.stage2, key))
    try:
        tokenizer = trained_tokenizer(tokenizer_checkpoint.model, run_cfg.model, run_cfg.data, device)
        transformer = trained_transformer(checkpoint.model, run_cfg, tokenizer, device)
    except RuntimeError as exc:  # load_state_dict: weights of an architecture this code no longer builds
        first = str(exc).splitlines()[0]
        raise NoTrainedGenerator(
            f"stage-2 {checkpoint.name} (or its tokenizer {tokenizer_checkpoint.name}) does not fit the models this "
            f"version of the job builds ({first}): it was trained by another version; train it again in a new --run-uri"
        ) from exc
    if checkpoint.state.get("reason") != "final":
        log.warning("generation.stage2_unfinished", checkpoint=checkpoint.name, step=checkpoint.step)
    return TrainedGenerator(tokenizer, transformer, device, run_cfg, checkpoint, tokenizer_checkpoint)


class NothingToEvaluate(ConfigError):
    """The run folder holds no checkpoint that passes verification (exit 2: wrong run URI)."""


def load_best_checkpoint(checkpointer: CheckpointReader) -> tuple[Checkpoint, str]:
    """The best checkpoint by validation loss, as the newest valid checkpoint records it; the
    newest valid one itself when the best is not recorded or fails verification. Returns it with
    a sentence saying which was used and why."""
    newest = checkpointer.load_newest_valid()
    if newest is None:
        raise NothingToEvaluate(f"no checkpoint in {checkpointer.store.uri} passes verification; nothing to evaluate")
    best = (newest.state.get("best") or {}).get("checkpoint")
    if best is None:
        return newest, f"newest valid checkpoint {newest.name} (the run records no best)"
    if best == newest.name:
        return newest, f"best checkpoint by validation loss ({best}, also the newest)"
    try:
        return checkpointer.load(best), f"best checkpoint by validation loss ({best})"
    except CheckpointError as exc:
        log.warning("evaluate.best_unusable", checkpoint=best, reason=str(exc), using=newest.name)
        return newest, f"newest valid checkpoint {newest.name}: the best, {best}, fails verification ({exc})"


def evaluation_config(checkpoint: Checkpoint, cfg: Config) -> Config:
    """The run's own config, from the checkpoint, with this machine's choices from ``cfg``: the
    device, the thread count and, when given, where the data lives."""
    run_cfg = config_from_dict(checkpoint.state["config"])
    differing = diff_keys(checkpoint.state["config"], cfg.to_dict(), MATH_SECTIONS)
    if differing:
        log.info("evaluate.using_run_config", differing_keys=differing)
    set_value(run_cfg, "train.device", cfg.train.device)
    set_value(run_cfg, "train.threads", cfg.train.threads)
    if cfg.data.uri:
        set_value(run_cfg, "data.uri", cfg.data.uri)
    return run_cfg
