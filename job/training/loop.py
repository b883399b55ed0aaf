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

import json
import math
import time

import structlog

from job.checkpoint import CheckpointReader, RNGState
from job.checkpointer import FINAL, SIGNAL, CheckpointManager, mirror_unsent
from job.config import Config, steps_per_epoch
from job.data import prepare_dataset_in_turn
from job.device import pick_device
from job.distributed import Topology
from job.monitoring.lifecycle import StopRequest, Watchdog
from job.monitoring.logs import RunLog, bind_run_context
from job.monitoring.progress import Heartbeat, Progress, RateMeter, format_duration, utc_now
from job.plot_worker import BackgroundPlots
from job.storage import Layout, RunStore, StorageError
from job.training.startup import agree_on_start, preflight, recorded_attempt, refuse_math_changes
from job.training.state import TrainState, epoch_order
from job.training.task import Task, TokenizerTask

log = structlog.get_logger("job.train")


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint has been saved (exit 143)."""


def train(cfg: Config, store: RunStore, topology: Topology = Topology()) -> None:
    """One attempt of a run. Under torchrun every rank calls this; rank 0 alone writes the run
    folder (the others get a read-only store), and all ranks resume from the checkpoint it picks."""
    preflight(cfg, store)
    device = pick_device(cfg, topology)
    topology.start(device, timeout_minutes=cfg.monitor.watchdog_minutes)
    if topology.distributed:
        bind_run_context(rank=topology.rank)
    reader = CheckpointReader(store)
    attempt, previous, publish_log = 0, None, lambda: None
    if topology.is_writer:
        attempt = recorded_attempt(store) + 1
        publish_log = RunLog(store, attempt).publish  # before the checkpoint search, so its warnings land there
        mirror_unsent(store)  # what a previous attempt committed locally but could not upload
        previous = reader.load_newest_valid()
    attempt, previous = agree_on_start(reader, topology, device, attempt, previous)
    bind_run_context(attempt=attempt)
    if previous is not None:
        refuse_math_changes(previous.state["config"], cfg)
    store.write_json(Layout.config, cfg.to_dict())

    total_steps = steps_per_epoch(cfg) * cfg.train.epochs
    done = previous.state if previous else {"step": 0, "epoch": 0}
    progress = Progress(
        store, attempt=attempt, epochs=cfg.train.epochs, total_steps=total_steps, step=done["step"],
        epoch=min(done["epoch"] + 1, cfg.train.epochs), last_checkpoint=previous.name if previous else None,
    )
    progress.update(status="starting")
    # The heartbeat covers the whole attempt: generating or downloading data can take minutes.
    heartbeat = Heartbeat(progress, cfg.monitor.heartbeat_seconds, on_beat=publish_log)
    state = TrainState()
    try:
        with StopRequest() as stop, heartbeat:
            dataset = prepare_dataset_in_turn(cfg, store, topology)
            task = TokenizerTask(cfg, dataset, device, total_steps, topology.distributed)
            parts = {
                "model": task.model, "optimizer": task.optimizer, "scheduler": task.scheduler,
                "rng": RNGState(), "train": state,
            }
            if previous is not None:
                previous.restore(parts)
                log.info(
                    "train.resumed", checkpoint=previous.name, step=state.step, epoch=state.epoch,
                    sample_in_epoch=state.sample_in_epoch,
                )
            else:
                log.info("train.fresh_start", total_steps=total_steps)
            state.attempt = attempt
            write_metrics(store, state.metrics)

            if state.step < total_steps:
                watchdog = Watchdog(
                    progress, cfg.monitor.watchdog_minutes * 60,
                    on_stall=lambda: flush_quietly(store, publish_log, cfg.storage.signal_flush_seconds),
                )
                plots = BackgroundPlots(store.write_bytes)

                def committed(name: str) -> None:  # on the checkpoint writer's thread
                    progress.update(last_checkpoint=name)
                    publish_log()

                checkpoints = CheckpointManager(
                    store, cfg.checkpoint, parts, extra={"config": cfg.to_dict()}, on_commit=committed,
                )
                trainer = Trainer(cfg, task, state, checkpoints, progress, topology, stop, watchdog, plots)
                try:
                    with watchdog:
                        trainer.run(total_steps)
                    plots.close(timeout=cfg.storage.signal_flush_seconds)  # the final plots
                finally:
                    plots.close(timeout=0)  # after a stop or failure the time is the upload flush's
                    checkpoints.close()
            else:
                log.info("train.already_complete", step=state.step, total_steps=total_steps)
    except Preempted:
        progress.update(status="preempted")
        flush_quietly(store, publish_log, cfg.storage.signal_flush_seconds)
        raise
    except Exception as exc:
        progress.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        flush_quietly(store, publish_log, cfg.storage.signal_flush_seconds)
        raise
    finally:
        topology.stop()
    progress.update(status="completed", step=state.step, eta_seconds=0)
    log.info("train.completed", step=state.step, best=state.best, checkpoint=progress.fields["last_checkpoint"])
    publish_log()


class Trainer:
    """The epochs and batches of one attempt: steps, validation, progress, and the checkpoints
    and plots they trigger."""

    def __init__(
        self, cfg: Config, task: Task, state: TrainState, checkpoints: CheckpointManager, progress: Progress,
        topology: Topology, stop: StopRequest, watchdog: Watchdog, plots: BackgroundPlots,
    ):
        self.cfg, self.task, self.state, self.checkpoints = cfg, task, state, checkpoints
        self.progress, self.topology, self.stop, self.watchdog, self.plots = progress, topology, stop, watchdog, plots
        self.store = checkpoints.store
        self.train_indices = task.dataset.split("train")
        val = task.dataset.split("val")
        self.val_indices = val[: cfg.train.val_batches * cfg.train.batch_size] if cfg.train.val_batches else val
        self.picture_indices = val[: len(cfg.data.classes)]  # one validation video per class
        self.rate = RateMeter()
        self.last_progress_write = 0.0
        self.last_plot: dict[str, float] = {}

    def run(self, total_steps: int) -> None:
        cfg, state, topology = self.cfg, self.state, self.topology
        batch_size = cfg.train.batch_size
        self.progress.update(status="running")
        while state.epoch < cfg.train.epochs:
            epoch_started = time.monotonic()
            order = epoch_order(cfg.seed, state.epoch, len(self.train_indices))
            while state.sample_in_epoch < len(order):
                batch = order[state.sample_in_epoch : state.sample_in_epoch + batch_size]
                mine = batch[topology.rank :: topology.world_size]
                loss = self.task.train_step(self.train_indices[mine])
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
        write_metrics(self.store, state.metrics)
        final = state.step >= total_steps
        if self.topology.is_writer and self.plot_due(Layout.loss_plot, final):  # the only rank that stores it
            self.plots.submit(Layout.loss_plot, "loss_curves", metrics=list(state.metrics))
        log.info("train.epoch", **record)
        self.progress.update(epoch=min(state.epoch + 1, self.cfg.train.epochs), loss=record["train_loss"])
        reason = FINAL if final else self.checkpoints.due(at_epoch_end=True)
        if reason:
            self.save(reason, val_loss=val["val_loss"])

    def save(self, reason: str, val_loss: float | None = None) -> None:
        if not self.topology.is_writer:
            return
        name = self.checkpoints.save(reason, val_loss)
        if reason != SIGNAL and self.plot_due(Layout.reconstruction_plot, final=reason == FINAL):
            plot, arguments = self.task.picture(self.picture_indices, f"{name}: original | reconstruction | error")
            self.plots.submit(Layout.reconstruction_plot, plot, **arguments)

    def plot_due(self, rel: str, final: bool) -> bool:
        """Rendering costs a CPU core (in the plot worker) and the arrays cost a forward pass, so a
        plot is redrawn at most every ``monitor.plot_every_seconds`` (always at the end)."""
        now = time.monotonic()
        if final or now - self.last_plot.get(rel, -math.inf) >= self.cfg.monitor.plot_every_seconds:
            self.last_plot[rel] = now
            return True
        return False

    def report_batch(self, loss: float, total_steps: int) -> None:
        state, cfg = self.state, self.cfg
        self.rate.add(state.step * cfg.train.batch_size)
        if state.step % cfg.train.log_every_batches and state.step != total_steps:
            return
        rate = self.rate.rate()
        eta = self.rate.eta((total_steps - state.step) * cfg.train.batch_size)
        log.info(
            "train.progress", epoch=state.epoch + 1, epochs=cfg.train.epochs,
            batch=math.ceil(state.sample_in_epoch / cfg.train.batch_size), batches=steps_per_epoch(cfg),
            step=state.step, total_steps=total_steps, loss=round(loss, 6),
            lr=self.task.scheduler.get_last_lr()[0], samples_per_second=rate and round(rate, 1),
            eta=eta and format_duration(eta),
        )
        now = time.monotonic()
        if now - self.last_progress_write >= cfg.monitor.progress_every_seconds:
            self.last_progress_write = now
            self.progress.update(step=state.step, loss=loss, samples_per_second=rate, eta_seconds=eta)


def write_metrics(store: RunStore, metrics: list[dict]) -> None:
    """metrics.jsonl is rewritten whole from the history, so that epochs redone after a resume
    appear once."""
    store.write_text(Layout.metrics, "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))


def flush_quietly(store: RunStore, publish_log, timeout: float) -> None:
    """On the way out after a failure: deliver what can be delivered in ``timeout``; the original
    failure, not the upload backlog, is what the exit code reports."""
    publish_log()
    try:
        store.flush(timeout)
    except StorageError as exc:
        log.error("storage.backlog_left", error=str(exc))
