"""``train``: the story of one attempt of a run (SPEC §7), readable top to bottom.

1. Preflight the run folder, number the attempt, find the newest valid checkpoint, refuse a
   resume that would change the math.
2. Make sure the dataset exists; build the task (model, optimizer, schedule).
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
import json
import math
import time
from dataclasses import dataclass

import structlog

from job.checkpoint import Checkpoint, CheckpointReader, RNGState
from job.checkpointer import FINAL, SIGNAL, CheckpointManager, Diverged, mirror_unsent
from job.config import Config
from job.data import prepare_dataset_in_turn
from job.device import pick_device
from job.distributed import Topology
from job.fsutil import DiskFull
from job.monitoring.lifecycle import StopRequest, Stopped, Watchdog, stop_requests
from job.monitoring.logs import RunLog, bind_run_context
from job.monitoring.progress import Heartbeat, Progress, RateMeter, format_duration, utc_now
from job.plot_worker import BackgroundPlots
from job.storage import Layout, RunStore, StorageError
from job.storage.lease import Lease, LeaseError
from job.training.stage2 import (
    TokenizerMismatch, TokenizerRef, TransformerTask, refuse_other_tokenizer, stage1_tokenizer,
)
from job.training.stages import StagePlan, stage_plans
from job.training.startup import (
    agree_on_start, preflight, recorded_attempt, refuse_math_changes, refuse_to_start_over, writer_lease,
)
from job.training.state import TrainState, epoch_order
from job.training.task import Task, TokenizerTask

log = structlog.get_logger("job.train")


class Preempted(Stopped):
    """SIGTERM or SIGINT arrived during training; a checkpoint has been saved (exit 143)."""


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
    plans = stage_plans(cfg)
    attempt, publish_log = 0, lambda: None
    if topology.is_writer:
        attempt = recorded_attempt(store, lease) + 1
        lease.note_attempt(attempt)
        publish_log = RunLog(store, attempt).publish  # before the checkpoint search, so its warnings land there
        for plan in plans:
            mirror_unsent(store, plan.layout)  # what a previous attempt committed locally but could not upload
    # The first stage's checkpoint is found, and a change of math refused, before any data work.
    attempt, resume = find_resume_point(cfg, store, topology, device, plans[0], attempt)
    if len(plans) > 1 and topology.is_writer:
        refuse_to_orphan_stage2(store, plans[0], resume.previous, cfg)
    bind_run_context(attempt=attempt)
    store.write_json(Layout.config, cfg.to_dict())

    progress = Progress(store, attempt=attempt, stages=len(plans), **stage_progress(cfg, plans[0], resume.previous))
    progress.update(status="starting")
    # The heartbeat covers the whole attempt: generating or downloading data can take minutes.
    heartbeat = Heartbeat(progress, cfg.monitor.heartbeat_seconds, on_beat=publish_log)
    try:
        with stop_requests() as stop, heartbeat:
            dataset = prepare_dataset_in_turn(cfg, store, topology)
            watchdog = Watchdog(
                progress, cfg.monitor.watchdog_minutes * 60,
                on_stall=lambda: flush_quietly(store, publish_log, cfg.storage.signal_flush_seconds),
            )
            plots = BackgroundPlots(store.write_bytes)
            stages = Attempt(cfg, store, topology, device, attempt, dataset, progress, stop, watchdog, plots, publish_log)
            try:
                with watchdog:
                    stages.run_stage(plans[0], resume, lambda total: TokenizerTask(
                        cfg, dataset, device, total, topology.distributed,
                    ))
                    if len(plans) > 1:
                        stages.run_transformer_stage(plans[1])
                plots.close(timeout=cfg.storage.signal_flush_seconds)  # the final plots
            finally:
                plots.close(timeout=0)  # after a stop or failure the time is the upload flush's
    except Stopped:  # in training (Preempted, saved) or in a phase before it (nothing half-written)
        record_end(progress, status="preempted")
        flush_quietly(store, publish_log, cfg.storage.signal_flush_seconds)
        raise
    except LeaseError:
        raise  # this process may not write the run: not a word more to it
    except Exception as exc:
        record_end(progress, status="failed", error=f"{type(exc).__name__}: {exc}")
        flush_quietly(store, publish_log, cfg.storage.signal_flush_seconds)
        raise
    progress.update(status="completed", eta_seconds=0)
    log.info("train.completed", stage=progress.fields["stage"], checkpoint=progress.fields["last_checkpoint"])
    publish_log()
    store.flush(cfg.storage.flush_seconds)  # while the lease is still held


@dataclass
class ResumePoint:
    inventory: dict[str, bool]  # the stage's checkpoint folders, listed when the store last answered
    previous: Checkpoint | None  # the newest valid one, if any


def find_resume_point(
    cfg: Config, store: RunStore, topology: Topology, device, plan: StagePlan, attempt: int,
) -> tuple[int, ResumePoint]:
    """The stage's newest valid checkpoint (rank 0 picks, every rank loads it), after refusing a
    resume whose config changes the stage's math."""
    reader = CheckpointReader(store, plan.layout)
    inventory, previous = {}, None
    if topology.is_writer:
        inventory = reader.inventory()  # now, while the run URI has just answered
        previous = reader.load_newest_valid(list(inventory))
    attempt, previous = agree_on_start(reader, topology, device, attempt, previous)
    if previous is not None:
        refuse_math_changes(previous.state["config"], cfg, plan.math_sections)
    elif topology.is_writer:
        refuse_to_start_over(store, plan, inventory)
    return attempt, ResumePoint(inventory, previous)


def refuse_to_orphan_stage2(store: RunStore, tokenizer: StagePlan, previous: Checkpoint | None, cfg: Config) -> None:
    """A tokenizer trained for other epochs than the one stage 2 learned from (train.epochs
    raised) would leave stage 2's checkpoints orphaned: refuse before any work rather than after.
    (Redoing lost tokenizer steps is fine: the same steps give the same weights.)"""
    if previous is None or previous.step >= tokenizer.total_steps(cfg):
        return
    stage2 = CheckpointReader(store, Layout.transformer).load_newest_valid()
    learned_from = stage2.state["config"]["train"]["epochs"] if stage2 else cfg.train.epochs
    if learned_from != cfg.train.epochs:
        raise TokenizerMismatch(
            f"refusing to train the tokenizer for {cfg.train.epochs} epochs: stage 2 ({stage2.name}) learned from "
            f"the tokenizer of a {learned_from}-epoch run; use a new --run-uri, or delete "
            f"{Layout.transformer.checkpoints}/ to train stage 2 again on the longer-trained tokenizer"
        )


def stage_progress(cfg: Config, plan: StagePlan, previous: Checkpoint | None) -> dict:
    """The progress fields that say where a stage stands."""
    done = previous.state if previous else {"step": 0, "epoch": 0}
    return {
        "stage": plan.number, "stage_name": plan.name, "epochs": plan.epochs, "total_steps": plan.total_steps(cfg),
        "step": done["step"], "epoch": min(done["epoch"] + 1, plan.epochs),
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
    dataset: object
    progress: Progress
    stop: StopRequest
    watchdog: Watchdog
    plots: BackgroundPlots
    publish_log: object

    def run_stage(self, plan: StagePlan, resume: ResumePoint, build_task) -> None:
        """Build the stage's task, restore every part from its newest checkpoint, and train it
        to its last epoch."""
        cfg, previous = self.cfg, resume.previous
        total_steps = plan.total_steps(cfg)
        task = build_task(total_steps)
        state = TrainState()
        parts = {"model": task.model, "optimizer": task.optimizer, "scheduler": task.scheduler, "rng": RNGState(),
                 "train": state}
        if previous is not None:
            previous.restore(parts)
            log.info(
                "train.resumed", stage=plan.number, checkpoint=previous.name, step=state.step, epoch=state.epoch,
                sample_in_epoch=state.sample_in_epoch,
            )
        else:
            log.info("train.fresh_start", stage=plan.number, total_steps=total_steps)
        state.attempt = self.attempt
        write_metrics(self.store, plan.layout.metrics, state.metrics)
        self.progress.update(**stage_progress(cfg, plan, previous))
        if state.step >= total_steps:
            log.info("train.already_complete", stage=plan.number, step=state.step, total_steps=total_steps)
            return

        def committed(name: str) -> None:  # on the checkpoint writer's thread
            # progress.json and the log reach the run URI with the next progress write or
            # heartbeat, which publishes the log too: nothing more to write or send per commit.
            self.progress.remember(last_checkpoint=name)

        checkpoints = CheckpointManager(
            self.store, plan.layout, cfg.checkpoint, parts, extra={"config": cfg.to_dict(), **task.identity},
            inventory=resume.inventory, on_commit=committed,
        )
        try:
            Trainer(cfg, plan, task, state, checkpoints, self.progress, self.topology, self.stop, self.watchdog,
                    self.plots).run(total_steps)
        finally:
            checkpoints.close()
        self.progress.update(step=state.step, eta_seconds=0)

    def run_transformer_stage(self, plan: StagePlan) -> None:
        """Stage 2, on the codes of the finished tokenizer's best checkpoint."""
        cfg, store = self.cfg, self.store
        reader = CheckpointReader(store, Layout.tokenizer)
        tokenizer = None
        if self.topology.is_writer:
            newest = reader.load_newest_valid()
            tokenizer = stage1_tokenizer(reader, newest)
        _, tokenizer = agree_on_start(reader, self.topology, self.device, self.attempt, tokenizer)
        _, resume = find_resume_point(cfg, store, self.topology, self.device, plan, self.attempt)
        if resume.previous is not None:
            refuse_other_tokenizer(resume.previous.state.get("tokenizer"), TokenizerRef.of(tokenizer))
        self.run_stage(plan, resume, lambda total: TransformerTask(
            cfg, self.dataset, self.device, total, self.topology.distributed, tokenizer, touch=self.watchdog.touch,
        ))


class Trainer:
    """The epochs and batches of one attempt: steps, validation, progress, and the checkpoints
    and plots they trigger."""

    def __init__(
        self, cfg: Config, plan: StagePlan, task: Task, state: TrainState, checkpoints: CheckpointManager,
        progress: Progress, topology: Topology, stop: StopRequest, watchdog: Watchdog, plots: BackgroundPlots,
    ):
        self.cfg, self.plan, self.task, self.state, self.checkpoints = cfg, plan, task, state, checkpoints
        self.progress, self.topology, self.stop, self.watchdog, self.plots = progress, topology, stop, watchdog, plots
        self.store = checkpoints.store
        self.train_indices = task.dataset.split("train")
        val = task.dataset.split("val")
        self.val_indices = val[: cfg.train.val_batches * plan.batch_size] if cfg.train.val_batches else val
        self.picture_indices = val[: len(cfg.data.classes)]  # one validation video per class
        self.rate = RateMeter()
        self.last_progress_write = 0.0
        # The plot clock starts with the attempt: a run shorter than plot_every_seconds draws
        # each plot once, at its end, rather than starting the plot worker (a Python process
        # importing matplotlib) in the middle of its few seconds of training.
        self.plots_started = time.monotonic()
        self.last_plot: dict[str, float] = {}

    def run(self, total_steps: int) -> None:
        cfg, plan, state, topology = self.cfg, self.plan, self.state, self.topology
        batch_size = plan.batch_size
        self.progress.update(status="running")
        while state.epoch < plan.epochs:
            epoch_started = time.monotonic()
            order = epoch_order(cfg.seed, state.epoch, len(self.train_indices), plan.order_stream)
            while state.sample_in_epoch < len(order):
                batch = order[state.sample_in_epoch : state.sample_in_epoch + batch_size]
                mine = batch[topology.rank :: topology.world_size]
                loss = self.task.train_step(self.train_indices[mine])
                if not math.isfinite(loss):
                    self.diverged(loss)
                state.step += 1
                state.sample_in_epoch += len(batch)
                state.epoch_loss_sum += loss
                state.epoch_batches += 1
                state.count_samples(topology.gather_indices(mine, self.task.device))
                self.watchdog.touch()
                self.report_batch(loss, total_steps)
                if topology.any_rank(self.stop.requested, self.task.device):
                    self.save(SIGNAL)
                    raise Preempted(f"stopped by {self.stop.signal_name or 'a peer rank'} at step {state.step}")
                if state.sample_in_epoch < len(order):
                    reason = self.checkpoints.due(at_epoch_end=False)
                    if reason:
                        self.save(reason)
            self.finish_epoch(time.monotonic() - epoch_started, total_steps)

    def diverged(self, loss: float) -> None:
        """Stop: every later step and checkpoint would be NaN too (the checkpointer refuses them)."""
        last = self.progress.fields["last_checkpoint"]
        lr_key = "stage2.lr" if self.plan.number == 2 else "optim.lr"
        lower = f"lower the learning rate ({lr_key}={self.task.scheduler.base_lrs[0]:g})"
        raise Diverged(
            f"stage {self.plan.number} ({self.plan.name}) diverged: the training loss is {loss} at step "
            f"{self.state.step + 1}; " + (
                f"the newest checkpoint stays {last}; {lower} in a new --run-uri (a resume keeps the run's own)"
                if last else f"no checkpoint was saved; {lower} and start again"
            )
        )

    def finish_epoch(self, seconds: float, total_steps: int) -> None:
        state = self.state
        val = self.task.validate(self.val_indices, touch=self.watchdog.touch)
        record = {
            "epoch": state.epoch + 1,
            "step": state.step,
            "samples": state.epoch_sample_count,
            "samples_complete": state.epoch_complete(len(self.train_indices)),
            "train_loss": state.epoch_loss_sum / max(1, state.epoch_batches),
            **val,
            "lr": self.task.scheduler.get_last_lr()[0],
            "seconds": round(seconds, 3),
            "attempt": state.attempt,
            "time": utc_now(),
        }
        state.metrics.append(record)
        state.start_next_epoch()
        write_metrics(self.store, self.plan.layout.metrics, state.metrics)
        final = state.step >= total_steps
        log.info("train.epoch", stage=self.plan.number, **record)
        self.progress.update(epoch=min(state.epoch + 1, self.plan.epochs), loss=record["train_loss"])
        reason = FINAL if final else self.checkpoints.due(at_epoch_end=True)
        if reason:
            self.save(reason, val_loss=val["val_loss"])
        # After the checkpoint: the final one is committed before the plot worker (a Python
        # process importing matplotlib, at a run's first plot) competes with its commit.
        loss_plot = self.plan.layout.loss_plot
        if self.topology.is_writer and self.plot_due(loss_plot, final):  # the only rank that stores it
            self.plots.submit(loss_plot, "loss_curves", metrics=list(state.metrics))

    def save(self, reason: str, val_loss: float | None = None) -> None:
        if not self.topology.is_writer:
            return
        name = self.checkpoints.save(reason, val_loss)
        picture = self.plan.layout.picture_plot
        if reason != SIGNAL and self.plot_due(picture, final=reason == FINAL):
            plot, arguments = self.task.picture(self.picture_indices, f"{self.plan.name} {name}")
            self.plots.submit(picture, plot, **arguments)

    def plot_due(self, rel: str, final: bool) -> bool:
        """Rendering costs a CPU core (in the plot worker) and the arrays cost a forward pass, so a
        plot is redrawn at most every ``monitor.plot_every_seconds`` (always at the end)."""
        now = time.monotonic()
        if final or now - self.last_plot.get(rel, self.plots_started) >= self.cfg.monitor.plot_every_seconds:
            self.last_plot[rel] = now
            return True
        return False

    def report_batch(self, loss: float, total_steps: int) -> None:
        state, cfg, plan = self.state, self.cfg, self.plan
        self.rate.add(state.step * plan.batch_size)
        if state.step % cfg.train.log_every_batches and state.step != total_steps:
            return
        rate = self.rate.rate()
        eta = self.rate.eta((total_steps - state.step) * plan.batch_size)
        log.info(
            "train.progress", stage=plan.number, epoch=state.epoch + 1, epochs=plan.epochs,
            batch=math.ceil(state.sample_in_epoch / plan.batch_size), batches=plan.steps_per_epoch(cfg),
            step=state.step, total_steps=total_steps, loss=round(loss, 6),
            lr=self.task.scheduler.get_last_lr()[0], samples_per_second=rate and round(rate, 1),
            eta=eta and format_duration(eta),
        )
        now = time.monotonic()
        if now - self.last_progress_write >= cfg.monitor.progress_every_seconds:
            self.last_progress_write = now
            self.progress.update(step=state.step, loss=loss, samples_per_second=rate, eta_seconds=eta)


def write_metrics(store: RunStore, rel: str, metrics: list[dict]) -> None:
    """A stage's metrics.jsonl is rewritten whole from the history, so that epochs redone after a
    resume appear once."""
    store.write_text(rel, "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))


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
