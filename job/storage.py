"""The run folder (SPEC §4): the one place that knows its layout, behind a small interface.

Every file is written to a local working copy first, atomically. For a local run URI the
working copy *is* the run folder; a remote URI (``s3://``) will mirror it through fsspec
with a background uploader behind this same interface, so callers never learn which one
they have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from job.fsutil import atomic_write_bytes, atomic_write_json


class StorageError(RuntimeError):
    """The run folder cannot be used (unreachable, not writable, unsupported URI)."""


class Layout:
    """Relative paths inside a run folder. Nothing else spells these names."""

    progress = "progress.json"
    progress_text = "PROGRESS.txt"
    config = "config.json"
    metrics = "metrics.jsonl"
    logs = "logs"
    plots = "plots"
    data = "data"
    checkpoints = "checkpoints"
    latest = "checkpoints/latest.json"
    verify_report = "verify/report.json"
    eval = "eval"

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

    @staticmethod
    def log_file(attempt: int) -> str:
        return f"logs/attempt-{attempt:03d}.jsonl"


class RunStore:
    """A run folder addressed by relative paths (see ``Layout``)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.root = Path(uri).expanduser().resolve()

    def local_path(self, rel: str) -> Path:
        """Where ``rel`` lives in the local working copy (created parents included)."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.root / rel, data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, value: Any) -> None:
        atomic_write_json(self.root / rel, value)

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> Any | None:
        """The parsed file, or None when it is missing or not valid JSON (a reader never trusts
        a half-written file; atomic writes make that rare, but hands can still damage one)."""
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def list_dir(self, rel: str) -> list[str]:
        """Names directly inside folder ``rel`` (empty when it does not exist)."""
        folder = self.root / rel
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def delete_tree(self, rel: str) -> None:
        shutil.rmtree(self.root / rel, ignore_errors=True)

    def check_writable(self) -> None:
        """Preflight: the run folder can be created, written and read back."""
        probe = ".preflight"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.write_bytes(probe, b"ok")
            ok = self.read_bytes(probe) == b"ok"
            (self.root / probe).unlink()
        except OSError as exc:
            raise StorageError(f"run folder {self.uri} is not writable: {exc}") from exc
        if not ok:
            raise StorageError(f"run folder {self.uri}: a file written there did not read back")


def open_run_store(uri: str) -> RunStore:
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive, still a local path
        return RunStore(uri.removeprefix("file://"))
    raise StorageError(f"run URI {uri}: the {scheme}:// scheme is not supported yet; use a local path")
