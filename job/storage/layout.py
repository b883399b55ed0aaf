"""Relative paths inside a run folder (docs/run-folder.md; docs/generation.md): the one place that spells them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MANIFEST_FILE = "manifest.json"


def is_plain_file_name(name: Any) -> bool:
    """A manifest may only name files directly inside its own folder: no path, no ``..``."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


@dataclass(frozen=True)
class StageLayout:
    """Where one training stage keeps its checkpoints, metrics and plots. The tokenizer's are
    the run folder's top-level ones (docs/run-folder.md); the transformer's live under ``stage2/``."""

    checkpoints: str
    metrics: str
    loss_plot: str
    picture_plot: str
    label: str  # how reports name its checkpoints: label + name
    tensorboard: str  # its TensorBoard event files, one per attempt

    @property
    def latest(self) -> str:
        return f"{self.checkpoints}/latest.json"

    def checkpoint_dir(self, name: str) -> str:
        return f"{self.checkpoints}/{name}"

    def checkpoint_file(self, name: str, filename: str) -> str:
        return f"{self.checkpoints}/{name}/{filename}"

    def checkpoint_manifest(self, name: str) -> str:
        return f"{self.checkpoints}/{name}/{MANIFEST_FILE}"


class Layout:
    """Relative paths inside a run folder. Nothing else spells these names."""

    progress = "progress.json"
    lease = "lease.json"  # who writes the run now (one writer per run)
    progress_text = "PROGRESS.txt"
    config = "config.json"
    logs = "logs"
    plots = "plots"
    data = "data"
    data_manifest = "data/manifest.json"
    verify_report = "verify/report.json"
    eval = "eval"
    eval_report = "eval/report.json"
    eval_markdown = "eval/report.md"
    samples = "samples"
    samples_index = "samples/index.json"
    predictions = "predictions"
    predictions_index = "predictions/index.json"
    checkpoint_manifest_file = MANIFEST_FILE

    # The local cache's own files, never uploaded: the identity of the run it belongs to, and the
    # caches of other runs it replaced, moved aside (job.storage.cache).
    cache_run_id = ".run-id"
    cache_moved_aside = ".moved-aside"

    page = "index.html"  # the run page: one self-contained file (job.monitoring.page)
    tensorboard = "tensorboard"

    tokenizer = StageLayout(
        "checkpoints", "metrics.jsonl", "plots/loss.png", "plots/reconstruction.png", "", "tensorboard/tokenizer"
    )
    transformer = StageLayout(
        "stage2/checkpoints", "stage2/metrics.jsonl", "plots/stage2-loss.png", "plots/stage2-predictions.png", "stage2/",
        "tensorboard/transformer",
    )
    stages = (tokenizer, transformer)  # in the order a run trains them

    @classmethod
    def stage_numbered(cls, number: Any) -> StageLayout:
        """The layout of stage ``number`` (1, 2, ...); the first stage's for anything else."""
        return cls.stages[number - 1] if isinstance(number, int) and 1 <= number <= len(cls.stages) else cls.stages[0]

    # The tokenizer's, by their run-folder names (docs/run-folder.md).
    checkpoints = tokenizer.checkpoints
    latest = tokenizer.latest
    metrics = tokenizer.metrics
    loss_plot = tokenizer.loss_plot
    reconstruction_plot = tokenizer.picture_plot
    checkpoint_dir = tokenizer.checkpoint_dir
    checkpoint_file = tokenizer.checkpoint_file
    checkpoint_manifest = tokenizer.checkpoint_manifest

    # Files whose remote copies must arrive in the order they were written (a manifest after
    # the files it lists, latest.json after the manifest; TensorBoard's events after the
    # checkpoint that finished their epochs); everything else only needs its newest content to arrive.
    ordered_prefixes = ("checkpoints/", "stage2/checkpoints/", "data/", "tensorboard/")
    # Of those, the files whose arrival commits what was written before them: a checkpoint's
    # manifest and a stage's latest.json, the data's manifest.
    commit_files = (MANIFEST_FILE, "latest.json")

    @staticmethod
    def checkpoint_name(step: int) -> str:
        # Zero-padded so that names sort by step as strings do.
        return f"step-{step:08d}"

    @staticmethod
    def log_file(attempt: int) -> str:
        return f"logs/attempt-{attempt:03d}.jsonl"

    @staticmethod
    def attempt_of_log(filename: str) -> int | None:
        """The attempt number in a log file's name, or None for any other file."""
        stem = filename.removeprefix("attempt-").removesuffix(".jsonl")
        return int(stem) if filename.startswith("attempt-") and stem.isdigit() else None
