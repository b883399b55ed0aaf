"""Relative paths inside a run folder (SPEC §4): the one place that spells them."""

from __future__ import annotations


class Layout:
    """Relative paths inside a run folder. Nothing else spells these names."""

    progress = "progress.json"
    progress_text = "PROGRESS.txt"
    config = "config.json"
    metrics = "metrics.jsonl"
    logs = "logs"
    plots = "plots"
    loss_plot = "plots/loss.png"
    reconstruction_plot = "plots/reconstruction.png"
    data = "data"
    data_manifest = "data/manifest.json"
    checkpoints = "checkpoints"
    latest = "checkpoints/latest.json"
    verify_report = "verify/report.json"
    eval = "eval"

    # Files whose remote copies must arrive in the order they were written (a manifest after
    # the files it lists, latest.json after the manifest); everything else only needs its
    # newest content to arrive.
    ordered_prefixes = ("checkpoints/", "data/")

    @staticmethod
    def checkpoint_name(step: int) -> str:
        # Zero-padded so that names sort by step as strings do.
        return f"step-{step:08d}"

    @staticmethod
    def checkpoint_dir(name: str) -> str:
        return f"checkpoints/{name}"

    @staticmethod
    def checkpoint_file(name: str, filename: str) -> str:
        return f"checkpoints/{name}/{filename}"

    checkpoint_manifest_file = "manifest.json"

    @staticmethod
    def checkpoint_manifest(name: str) -> str:
        return f"checkpoints/{name}/{Layout.checkpoint_manifest_file}"

    @staticmethod
    def log_file(attempt: int) -> str:
        return f"logs/attempt-{attempt:03d}.jsonl"

    @staticmethod
    def attempt_of_log(filename: str) -> int | None:
        """The attempt number in a log file's name, or None for any other file."""
        stem = filename.removeprefix("attempt-").removesuffix(".jsonl")
        return int(stem) if filename.startswith("attempt-") and stem.isdigit() else None
