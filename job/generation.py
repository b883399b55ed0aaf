"""The trained stage-2 model, as ``sample``, ``predict`` and ``evaluate`` use it (SPEC §15): the
newest valid stage-2 checkpoint, the tokenizer checkpoint it names (verified, and checked to be
the very weights it learned from), both rebuilt from the run's own config."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import torch

from job.checkpoint import MODEL_FILE, Checkpoint, CheckpointError, CheckpointReader
from job.config import Config, ConfigError
from job.evaluate import evaluation_config
from job.model import VideoTokenizer, trained_tokenizer
from job.storage import Layout, RunStore
from job.training.stage2 import trained_transformer
from job.transformer import MaskedVideoTransformer

log = structlog.get_logger("job.generation")


class NoTrainedStage2(ConfigError):
    """The run holds no usable stage-2 checkpoint (exit 2: wrong run URI, or stage 2 not trained)."""


@dataclass
class Stage2Model:
    cfg: Config  # the run's own config, with this machine's device choices
    checkpoint: Checkpoint
    tokenizer_checkpoint: Checkpoint
    transformer: MaskedVideoTransformer
    tokenizer: VideoTokenizer
    device: torch.device

    @property
    def complete(self) -> bool:
        return self.checkpoint.state.get("reason") == "final"


def load_stage2(cfg: Config, store: RunStore, device: torch.device) -> Stage2Model:
    """Raises NoTrainedStage2 when the run has no valid stage-2 checkpoint or its tokenizer is
    missing or not the one it learned from."""
    checkpoint = CheckpointReader(store, Layout.transformer).load_newest_valid()
    if checkpoint is None:
        raise NoTrainedStage2(
            f"{store.uri} has no valid stage-2 checkpoint under {Layout.transformer.checkpoints}/: "
            "train stage 2 first (`train` runs it after the tokenizer unless stage2.epochs is 0)"
        )
    ref = checkpoint.state.get("tokenizer") or {}
    try:
        tokenizer_checkpoint = CheckpointReader(store, Layout.tokenizer).load(str(ref.get("checkpoint")))
    except CheckpointError as exc:
        raise NoTrainedStage2(f"stage-2 {checkpoint.name} learned from tokenizer {ref}, which is not usable: {exc}") from exc
    if tokenizer_checkpoint.manifest["files"][MODEL_FILE]["sha256"] != ref.get("sha256"):
        raise NoTrainedStage2(f"stage-2 {checkpoint.name} learned from tokenizer {ref}, but those weights have changed")
    run_cfg = evaluation_config(checkpoint, cfg)
    try:
        tokenizer = trained_tokenizer(tokenizer_checkpoint.model, run_cfg.model, run_cfg.data, device)
        transformer = trained_transformer(checkpoint.model, run_cfg, tokenizer, device)
    except RuntimeError as exc:  # load_state_dict: weights of an architecture this code no longer builds
        first = str(exc).splitlines()[0]
        raise NoTrainedStage2(
            f"stage-2 {checkpoint.name} (or its tokenizer {tokenizer_checkpoint.name}) does not fit the models this "
            f"version of the job builds ({first}): it was trained by another version; train it again in a new --run-uri"
        ) from exc
    if checkpoint.state.get("reason") != "final":
        log.warning("generation.stage2_unfinished", checkpoint=checkpoint.name, step=checkpoint.step)
    return Stage2Model(run_cfg, checkpoint, tokenizer_checkpoint, transformer, tokenizer, device)
