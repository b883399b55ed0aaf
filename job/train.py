"""``train``: the story of one run (SPEC §7), readable top to bottom.

1. Preflight the run folder, find the newest valid checkpoint, refuse a resume that would
   change the math.
2. Make sure the dataset exists; build model, optimizer and schedule.
3. Restore everything the checkpoint holds: weights, optimizer, schedule, random states, the
   position inside the epoch, the metrics history, the attempt counter.
4. Train: batches in a per-epoch order that is a pure function of (seed, epoch), so that a
   resumed run sees exactly the batches the uninterrupted one would have; validate at each
   epoch end; checkpoint by epochs, steps and minutes; stop at the end with a final one.

A killed and restarted run therefore ends with the same bytes of ``model.safetensors`` as a
run that was never interrupted (on the same CPU machine).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch.nn.parallel import DistributedDataParallel

from job.checkpoint import Checkpoint, Checkpointer, restore
from job.distributed import Topology
from job.config import MATH_SECTIONS, Config, ConfigError, diff_keys, split_sizes
from job.data import DataError, VideoDataset, generate_dataset
from job.model import VideoTokenizer, codebook_stats, compute_loss, reconstruction_loss
from job.monitor import (
    Heartbeat, Progress, RateMeter, StopRequest, Watchdog, add_log_file, bind_run_context, format_duration, utc_now,
)
from job.plot_worker import BackgroundPlots
from job.storage import Layout, RunStore, StorageError

log = structlog.get_logger("job.train")


class ResumeRefused(ConfigError):
    """The run folder holds a run whose math differs from the requested config (exit 2)."""


@dataclass
class Position:
    """Where training stands; saved in every checkpoint and restored on resume."""

    step: int = 0
    epoch: int = 0  # epochs completed
    sample_in_epoch: int = 0  # samples of the current epoch's order already trained on
    epoch_loss_sum: float = 0.0  # running train loss of the current epoch, across resumes
    epoch_batches: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"checkpoint": name, "val_loss": x}
    attempt: int = 0
    epoch_sample_count: int = 0  # samples trained on in the current epoch, by the whole group
    epoch_sample_hash: int = 0  # order-free digest of which samples those were (see sample_digest)

    def count_samples(self, positions: np.ndarray) -> None:
        self.epoch_sample_count += len(positions)
        self.epoch_sample_hash = (self.epoch_sample_hash + sample_digest(positions)) % 2**64


# --- the run -----------------------------------------------------------------------------


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
    checkpointer = Checkpointer(store, cfg.checkpoint.keep_last)
    attempt, previous, log_file = 0, None, ""
    if topology.is_writer:
        attempt = recorded_attempt(store) + 1
        log_file = Layout.log_file(attempt)
        add_log_file(store.local_path(log_file))  # before the checkpoint search, so its warnings land there
        checkpointer.mirror_unsent()  # what a previous attempt committed locally but could not upload
        previous = checkpointer.load_newest_valid()
    attempt, previous = agree_on_start(checkpointer, topology, device, attempt, previous)
    bind_run_context(attempt=attempt)
    position = Position()
    if previous is not None:
        refuse_math_changes(previous.state["config"], cfg)
        position = position_from_state(previous.state)
    position.attempt = attempt
    store.write_json(Layout.config, cfg.to_dict())

    total_steps = steps_per_epoch(cfg) * cfg.train.epochs
    progress = Progress(
        store, attempt=position.attempt, epochs=cfg.train.epochs, total_steps=total_steps,
        step=position.step, epoch=min(position.epoch + 1, cfg.train.epochs),
        last_checkpoint=previous.name if previous else None,
    )
    progress.update(status="starting")
    # The heartbeat covers the whole attempt: generating or downloading data can take minutes.
    heartbeat = Heartbeat(progress, cfg.monitor.heartbeat_seconds, on_beat=lambda: store.publish(log_file))
    try:
        with StopRequest() as stop, heartbeat:
            dataset = prepare_dataset_in_turn(cfg, store, topology)
            model, optimizer, scheduler = build_training(cfg, device, total_steps)
            if previous is not None:
                restore(previous, model, optimizer, scheduler)
                log.info(
                    "train.resumed", checkpoint=previous.name, step=position.step, epoch=position.epoch,
                    sample_in_epoch=position.sample_in_epoch,
                )
            else:
                log.info("train.fresh_start", total_steps=total_steps)
            write_metrics(store, position.metrics)

            if position.step < total_steps:
                watchdog = Watchdog(
                    progress, cfg.monitor.watchdog_minutes * 60,
                    on_stall=lambda: flush_quietly(store, log_file, cfg.storage.signal_flush_seconds),
                )
                plots = BackgroundPlots(store.write_bytes)
                loop = TrainingLoop(
                    cfg, store, dataset, model, optimizer, scheduler, checkpointer, progress, position,
                    topology, device, stop, watchdog, plots,
                )
                try:
                    with watchdog:
                        loop.run(total_steps, steps_per_epoch(cfg))
                    plots.close(timeout=cfg.storage.signal_flush_seconds)  # the final plots
                finally:
                    plots.close(timeout=0)  # after a stop or failure the time is the upload flush's
            else:
                log.info("train.already_complete", step=position.step, total_steps=total_steps)
    except Preempted:
        progress.update(status="preempted")
        flush_quietly(store, log_file, cfg.storage.signal_flush_seconds)
        raise
    except Exception as exc:
        progress.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        flush_quietly(store, log_file, cfg.storage.signal_flush_seconds)
        raise
    finally:
        topology.stop()
    progress.update(status="completed", step=position.step, eta_seconds=0)
    log.info("train.completed", step=position.step, best=position.best, checkpoint=progress.fields["last_checkpoint"])
    store.publish(log_file)


def flush_quietly(store: RunStore, log_file: str, timeout: float) -> None:
    """On the way out after a failure: deliver what can be delivered in ``timeout``; the original
    failure, not the upload backlog, is what the exit code reports."""
    store.publish(log_file)
    try:
        store.flush(timeout)
    except StorageError as exc:
        log.error("storage.backlog_left", error=str(exc))


class TrainingLoop:
    """The epochs and batches of one attempt, and the checkpoints they trigger."""

    def __init__(
        self, cfg, store, dataset, model, optimizer, scheduler, checkpointer, progress, position, topology, device,
        stop, watchdog, plots,
    ):
        self.cfg, self.store, self.dataset = cfg, store, dataset
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.checkpointer, self.progress, self.pos = checkpointer, progress, position
        self.topology, self.device = topology, device
        # DDP averages gradients across ranks; saving, validating and plotting use the bare model.
        self.train_model = DistributedDataParallel(model) if topology.distributed else model
        self.stop, self.watchdog, self.plots = stop, watchdog, plots
        self.hang_at_step = int(os.environ.get("JOB_TEST_HANG_AT_STEP", "0"))  # fault drills only
        self.train_indices = dataset.split("train")
        self.val_indices = dataset.split("val")
        self.rate = RateMeter()
        self.last_save = time.monotonic()
        self.last_progress_write = 0.0
        self.last_plot: dict[str, float] = {}

    def run(self, total_steps: int, steps_per_epoch: int) -> None:
        cfg, pos = self.cfg, self.pos
        batch_size = cfg.train.batch_size
        self.progress.update(status="running")
        while pos.epoch < cfg.train.epochs:
            epoch_started = time.monotonic()
            order = epoch_order(cfg.seed, pos.epoch, len(self.train_indices))
            while pos.sample_in_epoch < len(order):
                batch = order[pos.sample_in_epoch : pos.sample_in_epoch + batch_size]
                mine = batch[self.topology.rank :: self.topology.world_size]
                loss = self.train_step(self.train_indices[mine])
                pos.step += 1
                pos.sample_in_epoch += len(batch)
                pos.epoch_loss_sum += loss
                pos.epoch_batches += 1
                pos.count_samples(self.topology.gather_indices(mine, self.device))
                self.watchdog.touch()
                self.report_batch(loss, total_steps, steps_per_epoch)
                if self.topology.any_rank(self.stop.requested, self.device):
                    self.save("signal")
                    raise Preempted(f"stopped by {self.stop.signal_name or 'a peer rank'} at step {pos.step}")
                if pos.sample_in_epoch < len(order):
                    reason = self.checkpoint_reason(at_epoch_end=False)
                    if reason:
                        self.save(reason)
            self.finish_epoch(time.monotonic() - epoch_started, total_steps)

    def train_step(self, indices: np.ndarray) -> float:
        if self.hang_at_step and self.pos.step + 1 == self.hang_at_step:
            threading.Event().wait()  # a step that never ends, for the watchdog drill
        videos, _ = self.dataset.get(indices)
        videos = videos.to(self.device, non_blocking=True)
        return optimizer_step(self.train_model, self.optimizer, self.scheduler, videos, self.cfg, self.autocast())

    def finish_epoch(self, seconds: float, total_steps: int) -> None:
        pos = self.pos
        val = self.validate()
        pos.epoch += 1
        record = {
            "epoch": pos.epoch,
            "step": pos.step,
            "samples": pos.epoch_sample_count,
            # every training sample exactly once this epoch, across resumes and world sizes
            "samples_complete": pos.epoch_sample_count == len(self.train_indices)
            and pos.epoch_sample_hash == sample_digest(np.arange(len(self.train_indices))),
            "train_loss": pos.epoch_loss_sum / max(1, pos.epoch_batches),
            **val,
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": round(seconds, 3),
            "attempt": pos.attempt,
            "time": utc_now(),
        }
        pos.metrics.append(record)
        pos.sample_in_epoch, pos.epoch_loss_sum, pos.epoch_batches = 0, 0.0, 0
        pos.epoch_sample_count, pos.epoch_sample_hash = 0, 0
        write_metrics(self.store, pos.metrics)
        final = pos.step >= total_steps
        if self.topology.is_writer and self.plot_due(Layout.loss_plot, final):  # the only rank that stores it
            self.plots.submit(Layout.loss_plot, "loss_curves", metrics=list(pos.metrics))
        log.info("train.epoch", **record)
        self.progress.update(epoch=min(pos.epoch + 1, self.cfg.train.epochs), loss=record["train_loss"])

        reason = "final" if final else self.checkpoint_reason(at_epoch_end=True)
        if reason:
            if pos.best is None or val["val_loss"] < pos.best["val_loss"]:
                pos.best = {"checkpoint": Layout.checkpoint_name(pos.step), "val_loss": val["val_loss"]}
            self.save(reason)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.eval()
        indices = self.val_indices
        batch_size = cfg.train.batch_size
        if cfg.train.val_batches:
            indices = indices[: cfg.train.val_batches * batch_size]
        losses, mses, codes = [], [], []
        for start in range(0, len(indices), batch_size):
            videos, _ = self.dataset.get(indices[start : start + batch_size])
            videos = videos.to(self.device)
            with self.autocast():
                out = self.model(videos)
            self.watchdog.touch()
            recon = out.recon.float()
            losses.append(float(reconstruction_loss(recon, videos, cfg.model)) * len(videos))
            mses.append(float(torch.mean((recon - videos) ** 2)) * len(videos))
            codes.append(out.codes.cpu())
        self.model.train()
        stats = codebook_stats(torch.cat(codes), self.model.codebook_size)
        n = len(indices)
        return {
            "val_loss": sum(losses) / n,
            "val_mse": sum(mses) / n,
            "codebook_usage": stats["usage"],
            "codebook_perplexity": stats["perplexity"],
        }

    def checkpoint_reason(self, at_epoch_end: bool) -> str | None:
        c, pos = self.cfg.checkpoint, self.pos
        if at_epoch_end and c.every_epochs and pos.epoch % c.every_epochs == 0:
            return "epochs"
        if c.every_steps and pos.step % c.every_steps == 0:
            return "steps"
        if c.every_minutes and time.monotonic() - self.last_save >= c.every_minutes * 60:
            return "minutes"
        return None

    def save(self, reason: str) -> None:
        if not self.topology.is_writer:
            return
        pos = self.pos
        started = time.monotonic()
        step, epoch, log_file = pos.step, pos.epoch, Layout.log_file(pos.attempt)

        def committed(name: str, seconds: float, pruned: list[str]) -> None:  # on the checkpoint thread
            log.info(
                "checkpoint.saved", checkpoint=name, reason=reason, step=step, epoch=epoch,
                seconds=round(seconds, 3), pruned=pruned,
            )
            self.progress.update(last_checkpoint=name)
            self.store.publish(log_file)

        name = self.checkpointer.save_async(
            step, epoch, self.model, self.optimizer, self.scheduler, state_from(pos, self.cfg, reason),
            best=pos.best["checkpoint"] if pos.best else None, on_commit=committed,
        )
        self.last_save = time.monotonic()
        log.info("checkpoint.snapshot", checkpoint=name, reason=reason, blocked_seconds=round(self.last_save - started, 4))
        if reason in ("final", "signal"):
            self.checkpointer.wait()  # the process is about to end: the commit must be done
        if reason != "signal" and self.plot_due(Layout.reconstruction_plot, final=reason == "final"):
            self.plot_reconstructions(name)

    def plot_due(self, rel: str, final: bool) -> bool:
        """Rendering costs a CPU core (in the plot worker) and the arrays cost a forward pass, so a
        plot is redrawn at most every ``monitor.plot_every_seconds`` (always at the end)."""
        now = time.monotonic()
        if final or now - self.last_plot.get(rel, -math.inf) >= self.cfg.monitor.plot_every_seconds:
            self.last_plot[rel] = now
            return True
        return False

    @torch.no_grad()
    def plot_reconstructions(self, checkpoint: str) -> None:
        """One validation sample per class, as the model now reconstructs it."""
        classes = self.cfg.data.classes
        indices = self.val_indices[: len(classes)]
        videos, labels = self.dataset.get(indices)
        self.model.eval()
        with self.autocast():
            recon = self.model(videos.to(self.device)).recon.float().cpu()
        self.model.train()
        self.plots.submit(
            Layout.reconstruction_plot, "reconstruction_grid", originals=videos[:, 0].numpy(),
            reconstructions=recon[:, 0].numpy(), labels=[classes[int(i)] for i in labels],
            title=f"{checkpoint}: original | reconstruction | error",
        )

    def report_batch(self, loss: float, total_steps: int, steps_per_epoch: int) -> None:
        pos, cfg = self.pos, self.cfg
        self.rate.add(pos.step * cfg.train.batch_size)
        if pos.step % cfg.train.log_every_batches and pos.step != total_steps:
            return
        rate = self.rate.rate()
        eta = self.rate.eta((total_steps - pos.step) * cfg.train.batch_size)
        log.info(
            "train.progress", epoch=pos.epoch + 1, epochs=cfg.train.epochs,
            batch=math.ceil(pos.sample_in_epoch / cfg.train.batch_size), batches=steps_per_epoch,
            step=pos.step, total_steps=total_steps, loss=round(loss, 6),
            lr=self.scheduler.get_last_lr()[0], samples_per_second=rate and round(rate, 1),
            eta=eta and format_duration(eta),
        )
        now = time.monotonic()
        if now - self.last_progress_write >= cfg.monitor.progress_every_seconds:
            self.last_progress_write = now
            self.progress.update(step=pos.step, loss=loss, samples_per_second=rate, eta_seconds=eta)

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.train.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


# --- pieces of the story -----------------------------------------------------------------


def preflight(cfg: Config, store: RunStore) -> None:
    """Before any work: the run folder is reachable and writable, and the local disk can hold the
    data and the kept checkpoints."""
    store.preflight(cfg.storage.connect_seconds)
    d = cfg.data
    dataset_bytes = 0 if d.uri else d.num_samples * (d.frames * d.height * d.width + 8)
    # weights + two AdamW moments, for the kept checkpoints plus best and the one being written
    checkpoint_bytes = 3 * 4 * estimate_parameters(cfg) * (cfg.checkpoint.keep_last + 2)
    needed = int(1.2 * (dataset_bytes + checkpoint_bytes)) + (64 << 20)
    free = shutil.disk_usage(store.root).free
    if free < needed:
        raise StorageError(
            f"not enough disk space under {store.root}: {free >> 20} MiB free, "
            f"about {needed >> 20} MiB needed for the dataset and the kept checkpoints"
        )


def estimate_parameters(cfg: Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in VideoTokenizer(cfg.model, cfg.data).parameters())


def refuse_math_changes(saved_config: dict[str, Any], cfg: Config) -> None:
    changed = diff_keys(saved_config, cfg.to_dict(), MATH_SECTIONS)
    if changed:
        raise ResumeRefused(
            "refusing to resume: the run's checkpoints were trained with different "
            f"{', '.join(changed)}; use a new --run-uri, or the run's own config "
            "(only train.epochs, checkpoint, monitor and logging settings may change)"
        )


def agree_on_start(
    checkpointer: Checkpointer, topology: Topology, device: torch.device, attempt: int, previous: Checkpoint | None
) -> tuple[int, Checkpoint | None]:
    """Rank 0's attempt number and checkpoint, on every rank: the others load that same
    checkpoint (verified against its manifest like any other read)."""
    step = previous.manifest["step"] if previous else -1
    attempt, step = topology.broadcast_ints([attempt, step], device)
    if previous is None and step >= 0:
        previous = checkpointer.load(Layout.checkpoint_name(step))
    return attempt, previous


def recorded_attempt(store: RunStore) -> int:
    """The highest attempt any earlier attempt left a trace of: progress.json or a log file
    (0 if none). Every attempt writes both as it starts."""
    progress = store.read_json(Layout.progress)
    attempts = [progress.get("attempt")] if isinstance(progress, dict) else []
    attempts += [Layout.attempt_of_log(name) for name in store.list_dir(Layout.logs)]
    return max((a for a in attempts if isinstance(a, int)), default=0)


def data_directory(cfg: Config, store: RunStore) -> Path:
    if cfg.data.uri:
        return Path(cfg.data.uri).expanduser()
    return store.local_path(Layout.data_manifest).parent


def prepare_dataset_in_turn(cfg: Config, store: RunStore, topology: Topology) -> VideoDataset:
    """Rank 0 generates or downloads the data first; the others then find it (same host) or
    fetch or regenerate the same bytes (another host)."""
    if topology.is_writer:
        dataset = prepare_dataset(cfg, store)
    topology.barrier()
    return dataset if topology.is_writer else prepare_dataset(cfg, store)


def prepare_dataset(cfg: Config, store: RunStore) -> VideoDataset:
    """Open the dataset: the local copy, else the run folder's (downloaded, then verified against
    its manifest), else a freshly generated one."""
    directory = data_directory(cfg, store)
    if not (directory / "manifest.json").exists() and not (cfg.data.uri or download_dataset(store)):
        run_generate(cfg, store)
    return VideoDataset(directory, cfg.data, verify=True)


def download_dataset(store: RunStore) -> bool:
    """Fetch the run folder's shards into the local copy, manifest last; False if it has none."""
    manifest = store.read_json(Layout.data_manifest)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        return False
    log.info("data.download", shards=len(manifest["shards"]))
    for shard in manifest["shards"]:
        for filename in shard.get("files", {}):
            if store.fetch(f"{Layout.data}/{Path(filename).name}") is None:
                raise DataError(f"{Layout.data}/{filename} is listed in the run's data manifest but missing")
    store.fetch(Layout.data_manifest)
    return True


def run_generate(cfg: Config, store: RunStore) -> dict[str, Any]:
    directory = data_directory(cfg, store)
    started = time.monotonic()

    def report(done: int, total: int) -> None:
        elapsed = time.monotonic() - started
        log.info(
            "generate.progress", samples=done, total=total, percent=round(100 * done / total, 1),
            samples_per_second=round(done / elapsed, 1) if elapsed > 0 else None,
        )

    log.info("generate.start", directory=str(directory), samples=cfg.data.num_samples)
    manifest = generate_dataset(cfg.data, directory, progress=report)
    log.info("generate.done", seconds=round(time.monotonic() - started, 2), shards=len(manifest["shards"]))
    if not cfg.data.uri:
        for shard in manifest["shards"]:  # mirrored shards first, the manifest that lists them last
            for filename in shard["files"]:
                store.publish(f"{Layout.data}/{filename}")
        store.publish(Layout.data_manifest)
    return manifest


def pick_device(cfg: Config, topology: Topology = Topology()) -> torch.device:
    device = topology.device(cfg.train.device)
    if device.type == "cpu":
        # Exact resume needs the same arithmetic every time: deterministic kernels, and a thread
        # count that does not depend on the moment the process started.
        torch.use_deterministic_algorithms(True)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
    elif not torch.cuda.is_available():
        raise ConfigError(f"train.device: {cfg.train.device} requested but CUDA is not available")
    return device


def build_training(cfg: Config, device: torch.device, total_steps: int):
    torch.manual_seed(cfg.seed)
    model = VideoTokenizer(cfg.model, cfg.data).to(device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
        foreach=False,  # the same kernels on every attempt; foreach is a speed detail we do not need on CPU
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(o.warmup_steps, total_steps, o.min_lr_ratio))
    return model, optimizer, scheduler


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup to the base rate, then cosine decay to ``min_ratio`` of it at the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_step(model, optimizer, scheduler, videos: torch.Tensor, cfg: Config, autocast=None) -> float:
    """One step of the math: forward, loss, backward, clipping, AdamW, schedule. Returns the loss
    (a host sync, which the progress log needs anyway)."""
    with autocast or nullcontext():
        out = model(videos)
        loss, _ = compute_loss(out, videos, cfg.model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def steps_per_epoch(cfg: Config) -> int:
    """Optimizer steps per epoch: the last batch of an epoch may be smaller, never dropped."""
    return math.ceil(split_sizes(cfg.data)[0] / cfg.train.batch_size)


def sample_digest(positions: np.ndarray) -> int:
    """A digest of a multiset of sample positions that does not depend on their order: the sum
    (mod 2**64) of a 64-bit mix of each. Training a sample twice, or skipping one, changes it."""
    x = np.asarray(positions, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return int(x.sum(dtype=np.uint64))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the training samples in one epoch: a pure function of (seed, epoch)."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def state_from(pos: Position, cfg: Config, reason: str) -> dict[str, Any]:
    return {
        "step": pos.step,
        "epoch": pos.epoch,
        "sample_in_epoch": pos.sample_in_epoch,
        "epoch_loss_sum": pos.epoch_loss_sum,
        "epoch_batches": pos.epoch_batches,
        "metrics": pos.metrics,
        "best": pos.best,
        "attempt": pos.attempt,
        "epoch_sample_count": pos.epoch_sample_count,
        "epoch_sample_hash": pos.epoch_sample_hash,
        "reason": reason,
        "config": cfg.to_dict(),
    }


def position_from_state(state: dict[str, Any]) -> Position:
    return Position(
        step=state["step"],
        epoch=state["epoch"],
        sample_in_epoch=state["sample_in_epoch"],
        epoch_loss_sum=state["epoch_loss_sum"],
        epoch_batches=state["epoch_batches"],
        metrics=list(state["metrics"]),
        best=state["best"],
        attempt=state["attempt"],
        epoch_sample_count=state["epoch_sample_count"],
        epoch_sample_hash=state["epoch_sample_hash"],
    )


def write_metrics(store: RunStore, metrics: list[dict[str, Any]]) -> None:
    """metrics.jsonl is rewritten whole from the history, so that epochs redone after a resume
    appear once."""
    store.write_text(Layout.metrics, "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))

