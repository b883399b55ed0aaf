"""Checkpoints (SPEC §4, §7, §10): format, manifest, commit order, finding the newest valid one.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding

- ``model.safetensors``: the weights alone; the same weights give the same bytes,
- ``optimizer.safetensors``: the optimizer's tensors,
- ``rng.safetensors``: the random generators' states,
- ``state.json``: everything else (position in the data, history, scheduler, config),
- ``manifest.json``: written last, the sha256 and size of every file above plus step, epoch
  and created_at. Without a manifest whose every hash matches, the folder does not count.

Nothing here unpickles: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from job.storage import Layout, RunStore

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = Layout.checkpoint_manifest_file
FORMAT_VERSION = 1
# What resuming reads from state.json (train.state_from writes them all).
REQUIRED_STATE = frozenset({
    "step", "epoch", "sample_in_epoch", "epoch_loss_sum", "epoch_batches", "epoch_sample_count",
    "epoch_sample_hash", "metrics", "best", "attempt", "config", "optimizer", "scheduler",
})

log = structlog.get_logger("job.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted."""


class ManifestMismatch(CheckpointError):
    """No readable manifest, or a file missing or differing from its size or sha256 there."""


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


@dataclass
class Snapshot:
    """Everything a checkpoint holds, copied off the live training state into host memory, so
    that training can go on while it is written."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state_json: bytes


def take_snapshot(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
) -> Snapshot:
    """The part of a checkpoint the training thread waits for: copies, nothing else."""
    optimizer_tensors, optimizer_json = _split_optimizer_state(optimizer.state_dict())
    return Snapshot(
        model=_host_copy(model.state_dict()),
        optimizer=_host_copy(optimizer_tensors),
        rng=_rng_states(),
        state_json=_json_bytes({**state, "optimizer": optimizer_json, "scheduler": scheduler.state_dict()}),
    )


def encode_snapshot(snapshot: Snapshot) -> dict[str, bytes]:
    """The files of a checkpoint, as bytes (no manifest yet)."""
    return {
        MODEL_FILE: save_tensors(snapshot.model),
        OPTIMIZER_FILE: save_tensors(snapshot.optimizer),
        RNG_FILE: save_tensors(snapshot.rng),
        STATE_FILE: snapshot.state_json,
    }


def encode_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
) -> dict[str, bytes]:
    return encode_snapshot(take_snapshot(model, optimizer, scheduler, state))


def make_manifest(files: dict[str, bytes], step: int, epoch: int) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in sorted(files.items())
        },
    }


class Checkpointer:
    """Writes, finds, loads and prunes the checkpoints of one run folder."""

    def __init__(self, store: RunStore, keep_last: int):
        self.store = store
        self.keep_last = keep_last
        self._folders: dict[str, bool] | None = None
        # One background writer, one checkpoint in flight: a commit that is slower than the
        # cadence makes the next save wait instead of piling up snapshots in memory.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def save(self, *args: Any, **kwargs: Any) -> str:
        """``save_async``, then wait until the checkpoint is committed. Returns its name."""
        name = self.save_async(*args, **kwargs)
        self.wait()
        return name

    def save_async(
        self,
        step: int,
        epoch: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: dict[str, Any],
        best: str | None = None,
        on_commit: Callable[[str, float, list[str]], None] | None = None,
    ) -> str:
        """Copy the state now; serialize, hash, write (files, manifest, latest.json) and prune in
        the background. ``on_commit(name, seconds, pruned)`` runs once it is committed."""
        self.wait()
        snapshot = take_snapshot(model, optimizer, scheduler, state)
        name = Layout.checkpoint_name(step)
        self._pending = self._writer.submit(self._commit, name, step, epoch, snapshot, best, on_commit)
        return name

    def wait(self) -> None:
        """Block until the checkpoint in flight is committed; raise what its commit raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _commit(
        self, name: str, step: int, epoch: int, snapshot: Snapshot, best: str | None,
        on_commit: Callable[[str, float, list[str]], None] | None,
    ) -> None:
        started = time.monotonic()
        files = encode_snapshot(snapshot)
        manifest = make_manifest(files, step, epoch)
        # A folder of this name can only be a leftover of an attempt that died before or
        # after committing it, from a step this attempt has redone: it is replaced.
        if name in self._inventory():
            self.store.delete_tree(Layout.checkpoint_dir(name))
        for filename, data in files.items():
            self.store.write_bytes(Layout.checkpoint_file(name, filename), data)
        self.store.write_json(Layout.checkpoint_file(name, MANIFEST_FILE), manifest)
        self.store.write_json(Layout.latest, {"checkpoint": name, "step": step})
        self._inventory()[name] = True
        pruned = self.prune(name, best)
        if on_commit is not None:
            on_commit(name, time.monotonic() - started, pruned)

    def mirror_unsent(self) -> None:
        """Queue for upload, in commit order, the checkpoints this machine's working copy holds
        but the run URI does not (an earlier attempt ended before its backlog drained)."""
        if self.store.remote is None:
            return
        local = [n for n in self.store.local.list_dir(Layout.checkpoints) if n.startswith("step-")]
        unsent = [
            n for n in local
            if self.store.local.exists(Layout.checkpoint_file(n, MANIFEST_FILE))
            and not self.store.exists_remotely(Layout.checkpoint_file(n, MANIFEST_FILE))
        ]
        for name in unsent:
            manifest = self.store.read_json(Layout.checkpoint_file(name, MANIFEST_FILE)) or {}
            for filename in manifest.get("files", {}):
                self.store.publish(Layout.checkpoint_file(name, filename))
            self.store.publish(Layout.checkpoint_file(name, MANIFEST_FILE))
            log.info("checkpoint.reupload", checkpoint=name)
        if unsent and self.store.local.exists(Layout.latest):
            self.store.publish(Layout.latest)

    def names(self) -> list[str]:
        """Checkpoint folder names, oldest first (committed or not)."""
        return sorted(self._inventory())

    def committed(self) -> list[str]:
        """Folders with a manifest, oldest first; cheap (hashes are not checked)."""
        return sorted(n for n, committed in self._inventory().items() if committed)

    def _inventory(self) -> dict[str, bool]:
        """Each checkpoint folder and whether it has a manifest. Listed once, at start, when the
        run URI has just answered the preflight; then kept current by save and prune, so that the
        training thread never waits on a store that may be away."""
        if self._folders is None:
            self._folders = {
                name: self.store.exists(Layout.checkpoint_manifest(name))
                for name in self.store.list_dir(Layout.checkpoints)
                if name.startswith("step-")
            }
        return self._folders

    def load(self, name: str) -> Checkpoint:
        """Read and verify every file against the manifest; raise CheckpointError on any doubt."""
        manifest = self.store.read_json(Layout.checkpoint_file(name, MANIFEST_FILE))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ManifestMismatch(f"{name}: no readable manifest.json")
        missing = {MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE} - set(manifest["files"])
        if missing:
            raise ManifestMismatch(f"{name}: manifest lacks {', '.join(sorted(missing))}")
        blobs = {}
        for filename, expected in manifest["files"].items():
            data = self.store.read_bytes(Layout.checkpoint_file(name, filename))
            if data is None:
                raise ManifestMismatch(f"{name}/{filename}: missing")
            if len(data) != expected.get("size"):
                raise ManifestMismatch(f"{name}/{filename}: size {len(data)}, manifest says {expected.get('size')}")
            if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
                raise ManifestMismatch(f"{name}/{filename}: sha256 does not match the manifest")
            blobs[filename] = data
        try:
            checkpoint = Checkpoint(
                name=name,
                manifest=manifest,
                model=load_tensors(blobs[MODEL_FILE]),
                optimizer=load_tensors(blobs[OPTIMIZER_FILE]),
                rng=load_tensors(blobs[RNG_FILE]),
                state=json.loads(blobs[STATE_FILE]),
            )
        except (ValueError, RuntimeError, SafetensorError) as exc:  # hashes matched, but the content is not ours
            raise UnreadableCheckpoint(f"{name}: unreadable content: {exc}") from exc
        missing_state = REQUIRED_STATE - set(checkpoint.state) if isinstance(checkpoint.state, dict) else REQUIRED_STATE
        if missing_state:
            raise UnreadableCheckpoint(f"{name}: state.json lacks {', '.join(sorted(missing_state))}")
        return checkpoint

    def load_newest_valid(self) -> Checkpoint | None:
        """The newest checkpoint that passes verification; each one skipped is logged as a warning."""
        for name in reversed(self.names()):
            try:
                return self.load(name)
            except CheckpointError as exc:
                log.warning("checkpoint.skipped", checkpoint=name, reason=str(exc))
        return None

    def prune(self, newest: str, best: str | None) -> list[str]:
        """Delete what the just-committed ``newest`` has replaced: committed checkpoints beyond the
        last ``keep_last`` (the best is kept), and leftovers older than ``newest``. The store
        removes a manifest before the files it lists, so a half-deleted folder never counts."""
        committed = [n for n in self.committed() if n <= newest]
        keep = set(committed[-self.keep_last :]) | {newest} | ({best} if best else set())
        doomed = [n for n in self.names() if n < newest and n not in keep]
        for name in doomed:
            self.store.delete_tree(Layout.checkpoint_dir(name))
            del self._folders[name]
        return doomed


def restore(
    checkpoint: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Put model, optimizer, scheduler and random generators back exactly as they were saved."""
    model.load_state_dict(checkpoint.model)
    optimizer.load_state_dict(_join_optimizer_state(checkpoint.optimizer, checkpoint.state["optimizer"]))
    scheduler.load_state_dict(checkpoint.state["scheduler"])
    torch.set_rng_state(checkpoint.rng["cpu"])
    cuda_states = [checkpoint.rng[k] for k in sorted(checkpoint.rng) if k.startswith("cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


# --- encoding helpers --------------------------------------------------------------------


def _host_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies, never views: training goes on changing the originals while these are written."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i:02d}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as (tensors for safetensors, the rest for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in rest["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
