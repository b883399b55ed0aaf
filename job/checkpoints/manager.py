"""Writing checkpoints (docs/run-folder.md; docs/storage.md), as torchtitan's CheckpointManager does: it holds the run's
stateful parts, decides when a checkpoint is due (epochs, steps, minutes), tracks the best by
validation loss, commits in the background in the order files, manifest, latest.json, and
prunes what a newer committed checkpoint has replaced.

The training thread only waits for copies of the state (``take_snapshot``); serializing,
hashing, writing and pruning happen on one writer thread, one checkpoint in flight at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import structlog
import torch

from job.checkpoints.format import Snapshot, Stateful, make_manifest, take_snapshot
from job.checkpoints.reader import delete_checkpoint
from job.checkpoints.train_state import TrainState
from job.config import CheckpointConfig
from job.exits import EXIT_FAILED
from job.storage import Layout, RunStore
from job.storage.folders import Stored
from job.storage.layout import StageLayout, is_plain_file_name

log = structlog.get_logger("job.checkpoint")

# Reasons a checkpoint is taken; the last two end the process, so their commit is waited for.
FINAL, SIGNAL = "final", "signal"


class Diverged(RuntimeError):
    """Training produced a non-finite loss or weights: nothing more is saved, so the newest
    committed checkpoint stays the last finite one (exit 1, status failed). The message says
    where and what to change."""

    exit_code, summary = EXIT_FAILED, "diverged"


class CheckpointManager:
    def __init__(
        self,
        store: RunStore,
        stage: StageLayout,
        cadence: CheckpointConfig,
        parts: dict[str, Stateful],
        extra: dict[str, Any],
        inventory: dict[str, bool],
        on_commit: Callable[[str, int], None] = lambda name, epochs: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``parts``: model, optimizer, scheduler, rng and train (a TrainState); ``extra``: what
        else the JSON state records (the config); ``inventory``: each checkpoint folder and whether
        it is committed (``CheckpointReader.inventory``), listed when the run URI has just
        answered, then kept current here, so that the training thread never waits on a store
        that may be away. ``on_commit(name, epochs)`` runs on the writer thread once a
        checkpoint is committed; ``epochs``: how many epochs it has finished."""
        self.store, self.stage, self.cadence, self.parts, self.extra = store, stage, cadence, parts, extra
        self.on_commit, self.clock = on_commit, clock
        self.last_save = clock()
        self._folders = dict(inventory)
        self._written: set[str] = set()  # committed by this manager: their files are known
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    @property
    def state(self) -> TrainState:
        return self.parts["train"]  # type: ignore[return-value]

    def due(self, at_epoch_end: bool) -> str | None:
        """Why a checkpoint is due now, or None."""
        c, state = self.cadence, self.state
        if at_epoch_end and c.every_epochs and state.epoch % c.every_epochs == 0:
            return "epochs"
        if c.every_steps and state.step % c.every_steps == 0:
            return "steps"
        if c.every_minutes and self.clock() - self.last_save >= c.every_minutes * 60:
            return "minutes"
        return None

    def save(self, reason: str, val_loss: float | None = None) -> str:
        """Snapshot the parts now and commit them in the background; with ``val_loss`` (an epoch
        end) the checkpoint becomes the best if it beats the best so far. A final or signal save
        waits for its commit: the process is about to end. Returns the checkpoint's name."""
        self.wait()
        state = self.state
        name = Layout.checkpoint_name(state.step)
        refuse_non_finite_loss(name, val_loss, state.epoch_loss_sum)
        if val_loss is not None and (state.best is None or val_loss < state.best["val_loss"]):
            state.best = {"checkpoint": name, "val_loss": val_loss}  # before the snapshot: the checkpoint's own state records it
        started = self.clock()
        snapshot = take_snapshot(self.parts, {**self.extra, "reason": reason})
        refuse_non_finite_tensors(name, snapshot)  # Diverged ends the run: nothing of this save survives
        best = state.best["checkpoint"] if state.best else None
        self._pending = self._writer.submit(self._commit, name, reason, state.step, state.epoch, snapshot, best)
        self.last_save = self.clock()
        log.info("checkpoint.snapshot", checkpoint=name, reason=reason, blocked_seconds=round(self.last_save - started, 4))
        if reason in (FINAL, SIGNAL):
            self.wait()
        return name

    def wait(self) -> None:
        """Block until the checkpoint in flight is committed; raise what its commit raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self._writer.shutdown(wait=False)

    def _commit(self, name: str, reason: str, step: int, epoch: int, snapshot: Snapshot, best: str | None) -> None:
        started = time.monotonic()
        files = snapshot.encode()
        manifest = make_manifest(files, step, epoch)
        # A folder of this name can only be a leftover of an attempt that died before or
        # after committing it, from a step this attempt has redone: it is replaced.
        if name in self._folders:
            delete_checkpoint(self.store, name, self.stage)
        for filename, data in files.items():
            self.store.write_bytes(self.stage.checkpoint_file(name, filename), data)
        self.store.write_json(self.stage.checkpoint_manifest(name), manifest)
        self.store.write_json(self.stage.latest, {"checkpoint": name, "step": step})
        self._folders[name] = True
        self._written.add(name)
        pruned = self._prune(name, best)
        log.info(
            "checkpoint.saved", checkpoint=name, stage=self.stage.checkpoints, reason=reason, step=step, epoch=epoch,
            seconds=round(time.monotonic() - started, 3), pruned=pruned,
        )
        self.on_commit(name, epoch)

    def _prune(self, newest: str, best: str | None) -> list[str]:
        """Delete what the just-committed ``newest`` has replaced: committed checkpoints beyond the
        last ``keep_last`` (the best is kept), and leftovers older than ``newest``. A checkpoint a
        run resumed from stays until a newer one is committed."""
        committed = sorted(n for n, done in self._folders.items() if done and n <= newest)
        keep = set(committed[-self.cadence.keep_last :]) | {newest} | ({best} if best else set())
        doomed = [n for n in sorted(self._folders) if n < newest and n not in keep]
        for name in doomed:
            delete_checkpoint(self.store, name, self.stage, written_here=name in self._written)
            del self._folders[name]
            self._written.discard(name)
        return doomed


def mirror_unsent(store: RunStore, stage: StageLayout) -> None:
    """Make the run URI hold what this machine's working copy has committed, from the store's
    listing of the run URI (``RunStore.snapshot``):

    - queue for upload, in commit order, the checkpoints the run URI lacks (an earlier attempt
      ended before its backlog drained). Only those newer than the run URI's latest.json: older
      ones are what a later writer pruned there (this cache's writer lost the run's lease), and
      must neither return nor turn latest.json back;
    - heal the ones whose manifest there is this one's but whose files are damaged or missing
      there, when the cached files verify against that manifest: their good bytes are sent again.
      Anything else (a cached copy that does not verify, a manifest another attempt wrote) is
      left as it is, and readers skip what does not verify."""
    if store.remote is None:
        return
    there = {rel: stored for rel, stored in store.snapshot().items() if rel.startswith(f"{stage.checkpoints}/")}
    newest_there = ""
    try:
        latest = store.read_remotely(stage.latest) if stage.latest in there else None
        newest_there = str(json.loads(latest or b"{}").get("checkpoint") or "")
    except (ValueError, AttributeError):
        pass  # an unreadable latest.json: every unsent checkpoint goes, as before it existed
    unsent = []
    for name in sorted(n for n in store.local.list_dir(stage.checkpoints) if n.startswith("step-")):
        manifest_rel = stage.checkpoint_manifest(name)
        manifest = store.local.read_bytes(manifest_rel)
        if manifest is None:
            continue  # not committed here
        if manifest_rel not in there:
            if name > newest_there:
                unsent.append(name)
        elif holds(store, manifest_rel, there[manifest_rel], manifest):
            heal(store, stage, name, manifest, there)
    for name in unsent:
        manifest = store.read_json(stage.checkpoint_manifest(name)) or {}
        for filename in manifest.get("files", {}):
            store.publish(stage.checkpoint_file(name, filename))
        store.publish(stage.checkpoint_manifest(name))
        log.info("checkpoint.reupload", checkpoint=name)
    if unsent and store.local.exists(stage.latest):
        store.publish(stage.latest)


def holds(store: RunStore, rel: str, stored: Stored, data: bytes) -> bool:
    """Whether the run URI's ``rel`` is ``data``: by the store's checksum where it proves it (no
    download), else by the object's own bytes."""
    return stored.proves(data) or store.read_remotely(rel) == data


def heal(store: RunStore, stage: StageLayout, name: str, manifest_bytes: bytes, there: dict[str, Stored]) -> None:
    """Send again the files of committed checkpoint ``name`` that the run URI lacks or holds
    damaged, if every cached file verifies against the manifest both copies share."""
    try:
        files = json.loads(manifest_bytes)["files"]
        sums = {filename: entry["sha256"] for filename, entry in files.items() if is_plain_file_name(filename)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return
    cached = {filename: store.local.read_bytes(stage.checkpoint_file(name, filename)) for filename in sums}
    if len(sums) != len(files) or not all(
        data is not None and hashlib.sha256(data).hexdigest() == sums[filename] for filename, data in cached.items()
    ):
        return  # the cached copy is no better than the run URI's: readers skip what does not verify
    damaged = [
        filename for filename, data in cached.items()
        if (rel := stage.checkpoint_file(name, filename)) not in there or not holds(store, rel, there[rel], data)
    ]
    for filename in damaged:
        store.publish(stage.checkpoint_file(name, filename))
    if damaged:
        log.warning("checkpoint.healed", checkpoint=name, files=damaged, uri=store.uri)


def refuse_non_finite_loss(name: str, val_loss: float | None, loss_sum: float) -> None:
    """The gates before a commit: a checkpoint with a NaN or infinite loss, weight or optimizer
    moment would become the one every restart resumes from (and the best one, by a NaN
    validation loss), so it is never written."""
    for label, value in (("validation loss", val_loss), ("epoch's training loss", loss_sum)):
        if value is not None and not math.isfinite(value):
            raise Diverged(f"not saving {name}: its {label} is {value}")


def refuse_non_finite_tensors(name: str, snapshot: Snapshot) -> None:
    """One fused pass on the training thread (a per-tensor loop cost it a dispatch per tensor):
    each floating tensor's L1 norm, accumulated in float64, is finite exactly when every value
    is (finite float32 values cannot overflow it), and NaN or infinite otherwise."""
    for label, tensors in (("weight", snapshot.model), ("optimizer state", snapshot.optimizer)):
        floating = {key: t for key, t in tensors.items() if t.is_floating_point()}
        if not floating:
            continue
        norms = torch.stack(torch._foreach_norm(list(floating.values()), 1, dtype=torch.float64))
        if bool(norms.isfinite().all()):
            continue
        key = next(key for key, norm in zip(floating, norms.tolist()) if not math.isfinite(norm))
        raise Diverged(f"not saving {name}: its {label} {key} holds NaN or infinite values")
