"""How an attempt begins (docs/run-folder.md; docs/storage.md): preflight the run folder and the disk, number the
attempt, agree across ranks on the checkpoint to resume from, and refuse a resume that would
change the math."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from job.checkpoints.reader import Checkpoint, CheckpointReader
from job.config import MATH_SECTIONS, Config, ConfigError, diff_keys, get_value
from job.models.tokenizer import tokenizer_parameters
from job.monitoring.watchdog import LeaseKeeper
from job.runtime.distributed import Topology
from job.runtime.signals import sleep_unless_stopped
from job.storage import Layout, RunStore, StorageError
from job.storage.cache import bind_cache
from job.storage.lease import Lease
from job.training.stages import Stage


class ResumeRefused(ConfigError):
    """The run folder holds a run whose math differs from the requested config (exit 2)."""


class SourceChanged(ResumeRefused):
    """A stage's checkpoints learned from another checkpoint of the stage before it than the
    one the run has now (exit 2)."""


def preflight(cfg: Config, store: RunStore) -> None:
    """Before any work: the run folder is reachable and writable, and the local disk can hold the
    data and the kept checkpoints."""
    store.preflight()
    d = cfg.data
    dataset_bytes = 0 if d.uri else d.num_samples * (d.frames * d.height * d.width + 8)
    # weights + two AdamW moments, for the kept checkpoints plus best and the one being written
    checkpoint_bytes = 3 * 4 * tokenizer_parameters(cfg) * (cfg.checkpoint.keep_last + 2)
    needed = int(1.2 * (dataset_bytes + checkpoint_bytes)) + (64 << 20)
    free = shutil.disk_usage(store.root).free
    if free < needed:
        raise StorageError(
            f"not enough disk space under {store.root}: {free >> 20} MiB free, "
            f"about {needed >> 20} MiB needed for the dataset and the kept checkpoints"
        )


@contextmanager
def writer_lease(cfg: Config, store: RunStore, topology: Topology) -> Iterator[Lease | None]:
    """One writer per run (docs/storage.md): the writing rank takes the run's lease before it writes
    anything, waiting up to two lease times for a live holder (LeaseBusy after that), fences
    every write of the store with it, renews it while the attempt runs, and releases it at the
    end, after the caller's last upload. A remote run's cache is bound to the run first
    (job.storage.cache)."""
    if not topology.is_writer:
        yield None
        return
    ttl = cfg.storage.lease_seconds
    lease = Lease(store.run_folder, ttl, sleep=sleep_unless_stopped("waiting for the run's lease"), patience=store.patience)
    lease.acquire(wait_seconds=2 * ttl)
    store.lease = lease
    if store.remote is not None:
        bind_cache(store.local, lease.run_id)  # before anything reads the cache: another run's is moved aside
        # The run folder's state, read once: start-up (attempt number, unsent checkpoints, resume
        # point, refusals, data) decides from this listing and the few objects it names.
        store.snapshot()
    try:
        with LeaseKeeper(lease):
            yield lease
    finally:
        lease.release()


def recorded_attempt(store: RunStore, lease: Lease) -> int:
    """The highest attempt any earlier attempt left a trace of (0 if none): progress.json or a
    log file, which every attempt writes as it starts through the uploader, or the lease this
    one replaced, which its holder wrote at the run URI at once (an attempt killed within its
    first second may have left nothing else)."""
    progress = store.read_json(Layout.progress)
    attempts = [progress.get("attempt")] if isinstance(progress, dict) else []
    attempts += [Layout.attempt_of_log(name) for name in store.list_dir(Layout.logs)]
    attempts.append(lease.previous_attempt)
    return max((a for a in attempts if isinstance(a, int)), default=0)


def agree_on_start(
    reader: CheckpointReader, topology: Topology, device: torch.device, attempt: int, previous: Checkpoint | None
) -> tuple[int, Checkpoint | None]:
    """Rank 0's attempt number and checkpoint, on every rank: the others load that same
    checkpoint (verified against its manifest like any other read)."""
    step = previous.step if previous else -1
    attempt, step = topology.broadcast_ints([attempt, step], device)
    if previous is None and step >= 0:
        previous = reader.load(Layout.checkpoint_name(step))
    return attempt, previous


def refuse_math_changes(saved_config: dict[str, Any], cfg: Config, sections: tuple[str, ...] = MATH_SECTIONS) -> None:
    changed = diff_keys(saved_config, cfg.to_dict(), sections)
    if changed:
        raise ResumeRefused(
            "refusing to resume: the run's checkpoints were trained with different "
            f"{', '.join(changed)}; use a new --run-uri, or the run's own config "
            "(only train.epochs, checkpoint, monitor and logging settings may change)"
        )


def refuse_to_start_over(store: RunStore, stage: Stage, inventory: dict[str, bool]) -> None:
    """No checkpoint of the stage is valid. Starting from scratch is right when none was ever
    committed (an attempt killed before its first save leaves progress, config, logs and perhaps
    a folder without a manifest: nothing to lose). But a committed one (a manifest, or the
    latest.json written after it) that no longer verifies is a damaged run: training over it
    would bury the evidence and overwrite what may still be restored, so refuse (exit 2)."""
    committed = sorted(name for name, has_manifest in inventory.items() if has_manifest)
    if not committed and not store.exists(stage.layout.latest):
        return
    found = f"committed checkpoint(s) {', '.join(committed)}" if committed else stage.layout.latest
    raise ResumeRefused(
        f"refusing to start {stage.name} over: {stage.layout.checkpoints}/ holds {found}, but none is valid "
        f"(the checkpoint.skipped warnings say why; `verify` checks each one). Restore them, or delete "
        f"{stage.layout.checkpoints}/ (or use a new --run-uri) to train from scratch"
    )


def refuse_other_source(stage: Stage, previous: Checkpoint, identity: dict[str, Any]) -> None:
    """A stage's checkpoints learned from one checkpoint of the stage before it; resuming them
    over any other would mix two models' outputs."""
    key = stage.learns_from.name
    saved = previous.state.get(key)
    if saved != identity[key]:
        raise SourceChanged(
            f"refusing to resume stage {stage.number}: its checkpoints learned from {key} {saved}, but the run's "
            f"{key} is {identity[key]} (stage {stage.learns_from.number} changed); use a new --run-uri, or delete "
            f"{stage.layout.checkpoints.rsplit('/', 1)[0]}/ to train stage {stage.number} again"
        )


def refuse_to_orphan_later_stages(
    store: RunStore, stages: list[Stage], previous: Checkpoint | None, cfg: Config,
) -> None:
    """Training the first stage for other epochs than a later stage learned from (its epochs
    raised) would leave the later stage's checkpoints orphaned: refuse before any work rather
    than after. (Redoing lost steps is fine: the same steps give the same weights.)"""
    first = stages[0]
    if previous is None or previous.step >= first.total_steps(cfg):
        return
    for stage in stages[1:]:
        later = CheckpointReader(store, stage.layout).load_newest_valid()
        learned_from = get_value(later.state["config"], first.epochs_key) if later else first.epochs(cfg)
        if learned_from != first.epochs(cfg):
            raise SourceChanged(
                f"refusing to train the {first.name} for {first.epochs(cfg)} epochs: stage {stage.number} ({later.name}) "
                f"learned from the {first.name} of a {learned_from}-epoch run; use a new --run-uri, or delete "
                f"{stage.layout.checkpoints}/ to train stage {stage.number} again on the longer-trained {first.name}"
            )
