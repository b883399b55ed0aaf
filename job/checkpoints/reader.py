"""Reading checkpoints back: find a stage's checkpoints, verify every file against its manifest, load
them with the safe loaders (safetensors, JSON). A reader never writes, and trusts nothing but a
manifest whose every file matches (docs/run-folder.md)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from job.checkpoints.format import (
    DATA_FILES,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    Stateful,
    _join_optimizer_state,
    decode_state,
)
from job.checkpoints.train_state import TrainState
from job.runtime.signals import stop_point
from job.storage import Layout, RunStore
from job.storage.layout import StageLayout, is_plain_file_name

log = structlog.get_logger("job.checkpoint")

# What resuming reads from the JSON state besides the train state.
REQUIRED_STATE = frozenset({"config", "optimizer", "scheduler", *TrainState.keys()})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted."""


class ManifestMismatch(CheckpointError):
    """No readable manifest, a name that is not a plain file of the folder, or a file missing or
    differing from its size or sha256 there."""


class UnreadableCheckpoint(CheckpointError):
    """Every hash matched, but the content does not parse as a checkpoint of ours."""


@dataclass
class Checkpoint:
    """A checkpoint read back and verified: tensors by file, and the JSON state."""

    name: str
    manifest: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def best(self) -> str | None:
        """The name of the best checkpoint by validation loss when this one was saved."""
        return (self.state.get("best") or {}).get("checkpoint")

    def restore(self, parts: dict[str, Stateful]) -> None:
        """Put every part back exactly as it was saved."""
        parts["model"].load_state_dict(self.model)
        parts["optimizer"].load_state_dict(_join_optimizer_state(self.optimizer, self.state["optimizer"]))
        parts["scheduler"].load_state_dict(self.state["scheduler"])
        parts["rng"].load_state_dict(self.rng)
        parts["train"].load_state_dict(self.state)


def delete_checkpoint(store: RunStore, name: str, stage: StageLayout = Layout.tokenizer, written_here: bool = False) -> None:
    """Remove a checkpoint, here and at the run URI: its manifest first, so that a half-deleted
    folder never counts as committed. ``written_here``: this process committed it, so it holds
    exactly the data files and the manifest, and the run URI need not be listed."""
    known = (*DATA_FILES, MANIFEST_FILE) if written_here else None
    store.delete_tree(stage.checkpoint_dir(name), first=(MANIFEST_FILE,), known=known)


class CheckpointReader:
    """Finds, verifies and loads the checkpoints of one stage of a run folder; never writes."""

    def __init__(self, store: RunStore, stage: StageLayout = Layout.tokenizer):
        self.store = store
        self.stage = stage

    def inventory(self) -> dict[str, bool]:
        """Each checkpoint folder, and whether it has a manifest (hashes not checked)."""
        return {
            name: self.store.exists(self.stage.checkpoint_manifest(name))
            for name in self.store.list_dir(self.stage.checkpoints)
            if name.startswith("step-")
        }

    def names(self) -> list[str]:
        """Checkpoint folder names, oldest first (committed or not)."""
        return sorted(self.inventory())

    def committed(self) -> list[str]:
        """Folders with a manifest, oldest first."""
        return sorted(name for name, committed in self.inventory().items() if committed)

    def load(self, name: str) -> Checkpoint:
        """Read and verify every file against the manifest; raise CheckpointError on any doubt."""
        manifest = self.store.read_json(self.stage.checkpoint_manifest(name))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ManifestMismatch(f"{name}: no readable manifest.json")
        foreign = [f for f in manifest["files"] if not is_plain_file_name(f)]
        if foreign:
            raise ManifestMismatch(f"{name}: the manifest names {foreign[0]!r}, not a plain file of its folder")
        if manifest.get("format") != FORMAT_VERSION:
            raise UnreadableCheckpoint(
                f"{name}: checkpoint format {manifest.get('format')!r}, this job reads format {FORMAT_VERSION} only"
            )
        missing = set(DATA_FILES) - set(manifest["files"])
        if missing:
            raise ManifestMismatch(f"{name}: manifest lacks {', '.join(sorted(missing))}")
        blobs = {}
        for filename, expected in manifest["files"].items():
            stop_point(f"reading checkpoint {name}")
            rel = self.stage.checkpoint_file(name, filename)
            data = self.store.read_bytes(rel)
            where = f"{self.store.uri.rstrip('/')}/{rel}"  # the object to look at (or restore)
            if data is None:
                raise ManifestMismatch(f"{name}/{filename}: missing ({where})")
            if not isinstance(expected, dict) or len(data) != expected.get("size"):
                raise ManifestMismatch(f"{name}/{filename}: size {len(data)}, manifest says {expected} ({where})")
            if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
                raise ManifestMismatch(f"{name}/{filename}: sha256 does not match the manifest ({where})")
            blobs[filename] = data
        try:
            optimizer, rng, state = decode_state(blobs[STATE_FILE])
            checkpoint = Checkpoint(
                name=name, manifest=manifest, model=load_tensors(blobs[MODEL_FILE]), optimizer=optimizer, rng=rng,
                state=state,
            )
        except (ValueError, RuntimeError, SafetensorError, KeyError, TypeError) as exc:  # hashes matched, but the content is not ours
            raise UnreadableCheckpoint(f"{name}: unreadable content: {exc!r}") from exc
        missing_state = REQUIRED_STATE - set(checkpoint.state) if isinstance(checkpoint.state, dict) else REQUIRED_STATE
        if missing_state:
            raise UnreadableCheckpoint(f"{name}: the JSON state lacks {', '.join(sorted(missing_state))}")
        return checkpoint

    def load_newest_valid(self, names: list[str] | None = None) -> Checkpoint | None:
        """The newest checkpoint (of ``names``, else of all) that passes verification; each one
        skipped is logged as a warning."""
        for name in reversed(sorted(self.names() if names is None else names)):
            try:
                return self.load(name)
            except CheckpointError as exc:
                log.warning("checkpoint.skipped", checkpoint=name, reason=str(exc))
        return None


@dataclass(frozen=True)
class SourceRef:
    """The checkpoint of an earlier stage whose model a later stage learns from: its name and the
    sha256 of its weights, as the later stage's checkpoints record it."""

    checkpoint: str
    sha256: str

    @staticmethod
    def of(checkpoint: Checkpoint) -> "SourceRef":
        return SourceRef(checkpoint.name, checkpoint.manifest["files"][MODEL_FILE]["sha256"])

    def as_dict(self) -> dict[str, str]:
        return {"checkpoint": self.checkpoint, "sha256": self.sha256}
