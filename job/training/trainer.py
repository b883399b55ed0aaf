"""The epochs and batches of one stage of one attempt (``Trainer``): steps in a per-epoch order that
is a pure function of (seed, epoch), validation at each epoch end, and the checkpoints, progress
and plots they trigger. ``job.training.loop`` builds one per stage and runs it."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import structlog
import torch
from torch.nn.parallel import DistributedDataParallel

from job.checkpoints.manager import FINAL, SIGNAL, CheckpointManager, Diverged
from job.checkpoints.train_state import TrainState
from job.config import Config
from job.data.dataset import VideoDataset
from job.monitoring.progress import Progress, RateMeter, format_duration, utc_now
from job.monitoring.tensorboard import TensorBoardLog
from job.monitoring.watchdog import Watchdog
from job.plots.background import BackgroundPlots
from job.runtime.device import autocast
from job.runtime.distributed import Topology
from job.runtime.signals import Stopped, StopRequest
from job.storage import RunStore
from job.training.optim import optimizer_step
from job.training.order import epoch_order
from job.training.stages import Stage, Task

log = structlog.get_logger("job.train")


class Preempted(Stopped):
    """SIGTERM or SIGINT arrived during training; a checkpoint has been saved (exit 143)."""


class Trainer:
    """The epochs and batches of one attempt: steps, validation, progress, and the checkpoints
    and plots they trigger."""

    def __init__(
        self, cfg: Config, stage: Stage, task: Task, dataset: VideoDataset, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainState, checkpoints: CheckpointManager,
        progress: Progress, topology: Topology, stop: StopRequest, watchdog: Watchdog, plots: BackgroundPlots,
        events: TensorBoardLog | None = None,
    ):
        self.cfg, self.stage, self.task, self.state, self.checkpoints = cfg, stage, task, state, checkpoints
        self.optimizer, self.scheduler = optimizer, scheduler
        self.progress, self.topology, self.stop, self.watchdog, self.plots = progress, topology, stop, watchdog, plots
        self.events = events  # TensorBoard: the writer's, None on other ranks
        self.store = checkpoints.store
        self.device = next(task.model.parameters()).device
        # DDP averages gradients across ranks; saving, validating and plotting use the bare model.
        self.train_model = DistributedDataParallel(task.model) if topology.distributed else task.model
        self.precision = autocast(self.device, cfg)
        self.batch_size, self.epochs = stage.batch_size(cfg), stage.epochs(cfg)
        self.train_indices = dataset.split("train")
        val = dataset.split("val")
        self.val_indices = val[: cfg.train.val_batches * self.batch_size] if cfg.train.val_batches else val
        self.picture_indices = val[: len(cfg.data.classes)]  # one validation video per class
        self.rate = RateMeter()
        self.last_progress_write = 0.0
        # The plot clock starts with the attempt: a run shorter than plot_every_seconds draws
        # each plot once, at its end, rather than starting the plot worker (a Python process
        # importing matplotlib) in the middle of its few seconds of training.
        self.plots_started = time.monotonic()
        self.last_plot: dict[str, float] = {}
        self.last_picture: tuple[int, str, dict[str, Any]] | None = None  # (step, plot, arguments)

    def run(self, total_steps: int) -> None:
        cfg, state, topology, batch_size = self.cfg, self.state, self.topology, self.batch_size
        self.progress.update(status="running")
        while state.epoch < self.epochs:
            epoch_started = time.monotonic()
            order = epoch_order(cfg.seed, state.epoch, len(self.train_indices), self.stage.order_stream)
            while state.sample_in_epoch < len(order):
                batch = order[state.sample_in_epoch : state.sample_in_epoch + batch_size]
                mine = batch[topology.rank :: topology.world_size]
                loss = self.step(self.train_indices[mine])
                if not math.isfinite(loss):
                    self.diverged(loss)
                state.step += 1
                state.sample_in_epoch += len(batch)
                state.epoch_loss_sum += loss
                state.epoch_batches += 1
                state.count_samples(topology.gather_indices(mine, self.device))
                self.watchdog.touch()
                self.report_batch(loss, total_steps)
                if topology.any_rank(self.stop.requested, self.device):
                    self.save(SIGNAL)
                    raise Preempted(f"stopped by {self.stop.signal_name or 'a peer rank'} at step {state.step}")
                if state.sample_in_epoch < len(order):
                    reason = self.checkpoints.due(at_epoch_end=False)
                    if reason:
                        self.save(reason)
            self.finish_epoch(time.monotonic() - epoch_started, total_steps)

    def step(self, indices: np.ndarray) -> float:
        return optimizer_step(
            lambda: self.task.loss(self.train_model, indices), self.task.model, self.optimizer, self.scheduler,
            self.cfg.optim.grad_clip, self.precision,
        )

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The model in eval mode, without gradients, under the run's autocast, for a moment."""
        model = self.task.model
        model.eval()
        try:
            with torch.no_grad(), self.precision:
                yield
        finally:
            model.train()

    def diverged(self, loss: float) -> None:
        """Stop: every later step and checkpoint would be NaN too (the checkpointer refuses them)."""
        last = self.progress.fields["last_checkpoint"]
        lower = f"lower the learning rate ({self.stage.lr_key}={self.scheduler.base_lrs[0]:g})"
        raise Diverged(
            f"stage {self.stage.number} ({self.stage.name}) diverged: the training loss is {loss} at step "
            f"{self.state.step + 1}; " + (
                f"the newest checkpoint stays {last}; {lower} in a new --run-uri (a resume keeps the run's own)"
                if last else f"no checkpoint was saved; {lower} and start again"
            )
        )

    def finish_epoch(self, seconds: float, total_steps: int) -> None:
        state = self.state
        with self.evaluating():
            val = self.task.validate(self.val_indices, touch=self.watchdog.touch)
        record = {
            "epoch": state.epoch + 1,
            "step": state.step,
            "samples": state.epoch_sample_count,
            "samples_complete": state.epoch_complete(len(self.train_indices)),
            "train_loss": state.epoch_loss_sum / max(1, state.epoch_batches),
            **val,
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": round(seconds, 3),
            "attempt": state.attempt,
            "time": utc_now(),
        }
        state.metrics.append(record)
        state.start_next_epoch()
        write_metrics(self.store, self.stage.layout.metrics, state.metrics)
        final = state.step >= total_steps
        log.info("train.epoch", stage=self.stage.number, **record)
        self.progress.update(epoch=min(state.epoch + 1, self.epochs), loss=record["train_loss"])
        reason = FINAL if final else self.checkpoints.due(at_epoch_end=True)
        if reason:
            self.save(reason, val_loss=val["val_loss"])
        # After the checkpoint: the final one is committed before the plot worker (a Python
        # process importing matplotlib, at a run's first plot) competes with its commit.
        loss_plot = self.stage.layout.loss_plot
        if self.topology.is_writer and self.plot_due(loss_plot, final):  # the only rank that stores it
            self.plots.submit(loss_plot, "loss_curves", metrics=list(state.metrics))
        if self.events is not None:
            self.picture_for_tensorboard(record["epoch"], state.step)

    def picture_for_tensorboard(self, epoch: int, step: int) -> None:
        """The stage's picture of this epoch, drawn by the plot worker into TensorBoard's events
        (a forward pass of one validation video per class here; the drawing off this thread)."""
        plot, arguments = self.picture(f"{self.stage.name} epoch {epoch}")
        events = self.events
        self.plots.submit_to(
            f"{self.stage.layout.tensorboard}/epoch-{epoch}", lambda _key, png: events.picture(epoch, step, png),
            plot, **arguments,
        )

    def save(self, reason: str, val_loss: float | None = None) -> None:
        if not self.topology.is_writer:
            return
        name = self.checkpoints.save(reason, val_loss)
        picture = self.stage.layout.picture_plot
        if reason != SIGNAL and self.plot_due(picture, final=reason == FINAL):
            plot, arguments = self.picture(f"{self.stage.name} {name}")
            self.plots.submit(picture, plot, **arguments)

    def picture(self, title: str) -> tuple[str, dict[str, Any]]:
        """The stage's picture of the model as it is now (a forward pass of one validation video
        per class; stage 2 decodes each in dozens): the checkpoint's and TensorBoard's of one
        step come from one pass."""
        if self.last_picture is None or self.last_picture[0] != self.state.step:
            with self.evaluating():
                self.last_picture = (self.state.step, *self.task.picture(self.picture_indices, title))
        _, plot, arguments = self.last_picture
        return plot, {**arguments, "title": title}

    def plot_due(self, rel: str, final: bool) -> bool:
        """Rendering costs a CPU core (in the plot worker) and the arrays cost a forward pass, so a
        plot is redrawn at most every ``monitor.plot_every_seconds`` (always at the end)."""
        now = time.monotonic()
        if final or now - self.last_plot.get(rel, self.plots_started) >= self.cfg.monitor.plot_every_seconds:
            self.last_plot[rel] = now
            return True
        return False

    def report_batch(self, loss: float, total_steps: int) -> None:
        state, cfg, stage, batch_size = self.state, self.cfg, self.stage, self.batch_size
        self.rate.add(state.step * batch_size)
        if state.step % cfg.train.log_every_batches and state.step != total_steps:
            return
        rate = self.rate.rate()
        eta = self.rate.eta((total_steps - state.step) * batch_size)
        log.info(
            "train.progress", stage=stage.number, epoch=state.epoch + 1, epochs=self.epochs,
            batch=math.ceil(state.sample_in_epoch / batch_size), batches=stage.steps_per_epoch(cfg),
            step=state.step, total_steps=total_steps, loss=round(loss, 6),
            lr=self.scheduler.get_last_lr()[0], samples_per_second=rate and round(rate, 1),
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
