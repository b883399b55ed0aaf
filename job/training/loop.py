"""``train``: the story of one attempt of a run, readable top to bottom (docs/architecture.md).

1. Preflight the run folder, number the attempt, find the newest valid checkpoint, refuse a
   resume that would change the math.
2. Make sure the dataset exists; for each stage, build its task (the model) and the optimizer
   and schedule.
3. Restore every stateful part the checkpoint holds: weights, optimizer, schedule, random
   states, the train state (position inside the epoch, metrics history, best, attempt).
4. Train: batches in a per-epoch order that is a pure function of (seed, epoch), so that a
   resumed run sees exactly the batches the uninterrupted one would have; validate at each
   epoch end; checkpoint when the checkpointer says one is due; a final one at the end.

A killed and restarted run therefore ends with the same bytes of ``model.safetensors`` as a
run that was never interrupted (on the same CPU machine).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import structlog

from job.checkpoints.format import RNGState
from job.checkpoints.manager import CheckpointManager, mirror_unsent
from job.checkpoints.reader import Checkpoint, CheckpointReader, SourceRef
from job.checkpoints.train_state import TrainState
from job.config import Config, get_value
from job.data.dataset import VideoDataset, prepare_dataset_in_turn
from job.monitoring.logs import RunLog, bind_run_context
from job.monitoring.page.write import PageWriter
from job.monitoring.progress import Heartbeat, Progress
from job.monitoring.tensorboard import TensorBoardLog
from job.monitoring.watchdog import Watchdog
from job.plots.background import BackgroundPlots
from job.runtime.device import pick_device
from job.runtime.distributed import Topology
from job.runtime.files import DiskFull
from job.runtime.signals import Stopped, StopRequest, stop_requests
from job.storage import Layout, RunStore, StorageError
from job.storage.lease import Lease, LeaseError
from job.training.optim import build_optimizer
from job.training.stages import Stage, TaskInputs, stages_of
from job.training.startup import (
    agree_on_start,
    preflight,
    recorded_attempt,
    refuse_math_changes,
    refuse_other_source,
    refuse_to_orphan_later_stages,
    refuse_to_start_over,
    writer_lease,
)
from job.training.trainer import Trainer, write_metrics

log = structlog.get_logger("job.train")


def train(cfg: Config, store: RunStore, topology: Topology = Topology()) -> None:
    """One attempt of a run: every stage still to train, in order. Under torchrun every rank calls
    this; rank 0 alone writes the run folder (the others get a read-only store), and all ranks
    resume from the checkpoints it picks."""
    preflight(cfg, store)
    device = pick_device(cfg, topology)
    topology.start(device, timeout_minutes=cfg.monitor.watchdog_minutes)
    if topology.distributed:
        bind_run_context(rank=topology.rank)
    try:
        with writer_lease(cfg, store, topology) as lease:
            train_attempt(cfg, store, topology, device, lease)
    finally:
        topology.stop()


def train_attempt(cfg: Config, store: RunStore, topology: Topology, device, lease: Lease | None) -> None:
    """The attempt proper, once this process may write the run (``lease``; None on other ranks)."""
    stages = stages_of(cfg)
    attempt, publish_log = 0, lambda: None
    if topology.is_writer:
        attempt = recorded_attempt(store, lease) + 1
        lease.note_attempt(attempt)
        publish_log = RunLog(store, attempt).publish  # before the checkpoint search, so its warnings land there
        for stage in stages:
            mirror_unsent(store, stage.layout)  # what a previous attempt committed locally but could not upload
    # The checkpoints to resume from are found, and a change of math refused, before any data work.
    attempt, resumes = find_resume_points(cfg, store, topology, device, stages, attempt)
    resuming = stages[len(resumes) - 1]
    bind_run_context(attempt=attempt)
    store.write_json(Layout.config, cfg.to_dict())

    # The run page follows progress.json (its own thread redraws it, at most as often as live
    # files are uploaded), reading this attempt's working copy.
    page = PageWriter.for_store(store, min_seconds=max(cfg.storage.live_upload_seconds, cfg.monitor.progress_every_seconds))
    progress = Progress(store, on_write=page.request, attempt=attempt, stages=len(stages),
                        **stage_progress(cfg, resuming, resumes[-1].previous))
    progress.update(status="starting")
    # The heartbeat covers the whole attempt: generating or downloading data can take minutes.
    heartbeat = Heartbeat(progress, cfg.monitor.heartbeat_seconds, on_beat=publish_log)
    try:
        with stop_requests() as stop, heartbeat, page:
            dataset = prepare_dataset_in_turn(cfg, store, topology)
            watchdog = Watchdog(
                progress, cfg.monitor.watchdog_minutes * 60,
                on_stall=lambda: flush_quietly(store, publish_log, cfg.storage.signal_flush_seconds),
            )
            plots = BackgroundPlots(store.write_bytes)
            shared = Attempt(cfg, store, topology, device, attempt, dataset, progress, stop, watchdog, plots)
            try:
                with watchdog:
                    for stage, resume in itertools.zip_longest(stages, resumes):
                        shared.run_stage(stage, resume)
                plots.finish(timeout=cfg.storage.flush_seconds)  # the final plots, even on a loaded CPU
            finally:
                plots.close(timeout=0)  # after a stop or failure the time is the upload flush's
                for events in shared.tensorboard:  # after the plots: the last pictures are in
                    events.close()
    except Stopped:  # in training (Preempted, saved) or in a phase before it (nothing half-written)
        record_end(progress, status="preempted")
        page.write_now()  # from the working copy: inside docker stop's 10 s, no listing of the bucket
        flush_quietly(store, publish_log, cfg.storage.signal_flush_seconds)
        raise
    except LeaseError:
        raise  # this process may not write the run: not a word more to it
    except Exception as exc:
        record_end(progress, status="failed", error=f"{type(exc).__name__}: {exc}")
        page.write_now()
        flush_quietly(store, publish_log, cfg.storage.signal_flush_seconds)
        raise
    progress.update(status="completed", eta_seconds=0)
    log.info("train.completed", stage=progress.fields["stage"], checkpoint=progress.fields["last_checkpoint"])
    page.write_now(store)  # the whole run folder, earlier attempts' logs in the bucket included
    publish_log()
    store.flush(cfg.storage.end_flush_seconds)  # while the lease is still held


@dataclass
class ResumePoint:
    inventory: dict[str, bool]  # the stage's checkpoint folders, listed when the store last answered
    previous: Checkpoint | None  # the newest valid one, if any


def find_resume_points(
    cfg: Config, store: RunStore, topology: Topology, device, stages: list[Stage], attempt: int,
) -> tuple[int, list[ResumePoint]]:
    """The resume points of the first stage and of each later one that a restart resumes into:
    the list ends with the first stage not finished yet (the last stage if all are), the one
    the attempt's progress names from its first write."""
    attempt, first = find_resume_point(cfg, store, topology, device, stages[0], attempt)
    if topology.is_writer:
        refuse_to_orphan_later_stages(store, stages, first.previous, cfg)
    resumes = [first]
    for finished, stage in zip(stages, stages[1:]):
        done = resumes[-1].previous
        if done is None or done.step < finished.total_steps(cfg):
            break
        attempt, resume = find_resume_point(cfg, store, topology, device, stage, attempt)
        resumes.append(resume)
    return attempt, resumes


def find_resume_point(
    cfg: Config, store: RunStore, topology: Topology, device, stage: Stage, attempt: int,
) -> tuple[int, ResumePoint]:
    """The stage's newest valid checkpoint (rank 0 picks, every rank loads it), after refusing a
    resume whose config changes the stage's math."""
    reader = CheckpointReader(store, stage.layout)
    inventory, previous = {}, None
    if topology.is_writer:
        inventory = reader.inventory()  # now, while the run URI has just answered
        previous = reader.load_newest_valid(list(inventory))
    attempt, previous = agree_on_start(reader, topology, device, attempt, previous)
    if previous is not None:
        refuse_math_changes(previous.state["config"], cfg, stage.math_sections)
    elif topology.is_writer:
        refuse_to_start_over(store, stage, inventory)
    return attempt, ResumePoint(inventory, previous)


def source_checkpoint(store: RunStore, topology: Topology, device, stage: Stage, attempt: int) -> Checkpoint | None:
    """The checkpoint whose model ``stage`` learns from: the best one of the stage before it by
    validation loss, as that finished stage records it (rank 0 picks, every rank loads it)."""
    if stage.learns_from is None:
        return None
    reader = CheckpointReader(store, stage.learns_from.layout)
    chosen = None
    if topology.is_writer:
        newest = reader.load_newest_valid()
        chosen = newest if newest.best in (None, newest.name) else reader.load(newest.best)
    return agree_on_start(reader, topology, device, attempt, chosen)[1]


def stage_progress(cfg: Config, stage: Stage, previous: Checkpoint | None) -> dict:
    """The progress fields that say where a stage stands."""
    done = previous.state if previous else {"step": 0, "epoch": 0}
    epochs = stage.epochs(cfg)
    return {
        "stage": stage.number, "stage_name": stage.name, "epochs": epochs, "total_steps": stage.total_steps(cfg),
        "step": done["step"], "epoch": min(done["epoch"] + 1, epochs),
        "last_checkpoint": previous.name if previous else None, "loss": None, "eta_seconds": None,
        "samples_per_second": None,
    }


@dataclass
class Attempt:
    """What every stage of one attempt shares."""

    cfg: Config
    store: RunStore
    topology: Topology
    device: object
    attempt: int
    dataset: VideoDataset
    progress: Progress
    stop: StopRequest
    watchdog: Watchdog
    plots: BackgroundPlots
    tensorboard: list[TensorBoardLog] = field(default_factory=list)  # each stage's, on the writer

    def run_stage(self, stage: Stage, resume: ResumePoint | None) -> None:
        """Find the stage's newest checkpoint (unless ``resume`` already is it), build its task,
        restore every part, and train it to its last epoch."""
        cfg, store, topology, device = self.cfg, self.store, self.topology, self.device
        source = source_checkpoint(store, topology, device, stage, self.attempt)
        if resume is None:
            _, resume = find_resume_point(cfg, store, topology, device, stage, self.attempt)
        previous = resume.previous
        identity = {stage.learns_from.name: SourceRef.of(source).as_dict()} if source is not None else {}
        if previous is not None and identity:
            refuse_other_source(stage, previous, identity)
        total_steps = stage.total_steps(cfg)
        task = stage.build_task(TaskInputs(cfg, self.dataset, device, source, self.watchdog.touch))
        optimizer, scheduler = build_optimizer(
            task.model, cfg, total_steps, lr=get_value(cfg, stage.lr_key), warmup_steps=get_value(cfg, stage.warmup_steps_key),
        )
        state = TrainState()
        parts = {"model": task.model, "optimizer": optimizer, "scheduler": scheduler, "rng": RNGState(), "train": state}
        if previous is not None:
            previous.restore(parts)
            log.info(
                "train.resumed", stage=stage.number, checkpoint=previous.name, step=state.step, epoch=state.epoch,
                sample_in_epoch=state.sample_in_epoch,
            )
        else:
            log.info("train.fresh_start", stage=stage.number, total_steps=total_steps)
        state.attempt = self.attempt
        write_metrics(store, stage.layout.metrics, state.metrics)
        if state.step >= total_steps:  # progress already names a later stage, or this last one
            log.info("train.already_complete", stage=stage.number, step=state.step, total_steps=total_steps)
            return
        self.progress.update(**stage_progress(cfg, stage, previous))

        events = None
        if topology.is_writer:
            events = TensorBoardLog(store, stage.layout, self.attempt, history=state.metrics[: state.epoch])
            self.tensorboard.append(events)

        def committed(name: str, epochs: int) -> None:  # on the checkpoint writer's thread
            # progress.json and the log reach the run URI with the next progress write or
            # heartbeat, which publishes the log too: nothing more to write or send per commit.
            self.progress.remember(last_checkpoint=name)
            if events is not None:
                events.committed(epochs, state.metrics)

        checkpoints = CheckpointManager(
            store, stage.layout, cfg.checkpoint, parts, extra={"config": cfg.to_dict(), **identity},
            inventory=resume.inventory, on_commit=committed,
        )
        try:
            Trainer(cfg, stage, task, self.dataset, optimizer, scheduler, state, checkpoints, self.progress, topology, self.stop,
                    self.watchdog, self.plots, events).run(total_steps)
        finally:
            checkpoints.close()
        self.progress.update(step=state.step, eta_seconds=0)


def record_end(progress: Progress, **fields) -> None:
    """The run's last word in progress.json. On a full disk the local write fails again, yet the
    run URI still gets it (``RunStore.write_bytes`` sends live files from memory); the error the
    exit reports is the one that ended the run, not this echo of it."""
    with contextlib.suppress(DiskFull):
        progress.update(**fields)


def flush_quietly(store: RunStore, publish_log, timeout: float) -> None:
    """On the way out after a failure: deliver what can be delivered in ``timeout``; the original
    failure, not the upload backlog, is what the exit code reports."""
    publish_log()
    try:
        store.flush(timeout)
    except StorageError as exc:
        log.error("storage.backlog_left", error=str(exc))
