"""What a checkpoint costs the job against Lightning, side by side: one JSON line per cadence.

    python bench/bench_vs_lightning.py [--cadences stress small large] [--repeats N]

Needs requirements-bench.txt (Lightning 2.6.6); the job itself never imports Lightning.

In this one process, on this project's model, data, batch order, AdamW, warmup-cosine schedule
and gradient clipping, three variants train the same steps:

- bare: the job's arithmetic alone (bench_overhead.bare_loop: forward, loss, backward, clip,
  AdamW, schedule, and the same validation at each epoch end), no checkpoints;
- job: job.training.loop.train() on an s3:// run folder (bench_overhead.full_job), the tokenizer
  stage alone, a checkpoint every N steps (no epoch-end ones, as Lightning's callback below),
  and its final one, with the preset's own monitoring (heartbeat, progress, logs, plots);
- lightning: ``Trainer.fit`` of a LightningModule around the same model and optimizer, with
  ``gradient_clip_val``, the schedule stepped every step, and
  ``ModelCheckpoint(dirpath="s3://...", every_n_train_steps=N, save_top_k=keep_last)``, which
  writes through fsspec/s3fs as Lightning does for any remote dirpath.

One moto S3 server in its own process serves both and logs every request it answers, so that
requests are counted where they arrive. Variants alternate (ABBA: bare, job, lightning, then
the reverse); medians of the repeats, each repeat given as well (the spread).

Reported per variant: the training phase's ratio over bare (the job: Trainer.run; Lightning:
on_train_start to on_train_end), per checkpoint the training thread's blocking (the median of
the calls that take a checkpoint on the cadence: CheckpointManager.save, which waits for the
previous commit if still running, and ModelCheckpoint.on_train_batch_end, which saves and
prunes; the job's final save, which waits for its commit, apart), the wall time and the
process's CPU time (all threads) beyond bare, CPU time by thread, the S3 server's CPU time, and
the requests the server answered (a run's all, and those on checkpoint paths).

Cadences: "stress" (smoke, 156 steps, every 10), "small" (small, 60 steps, every 10) and "large"
(the default model's width on small data, 8 steps of 1 video, every 3).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

import lightning.pytorch as pl
import numpy as np
import torch
from bench_overhead import bare_loop, full_job, same_weights, set_up, warm_up
from common import S3Server, ThreadCPU, emit, job_logging_to, median, note, spread
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from job.checkpoints.manager import FINAL, CheckpointManager
from job.config import steps_per_epoch
from job.data.dataset import VideoDataset
from job.models.tokenizer import compute_loss, initial_tokenizer
from job.training.optim import build_optimizer
from job.training.order import epoch_order

# The default preset's model (job/config.py ModelConfig) on small's 8 x 32 x 32 frames, one
# latent frame per frame as on every CPU preset.
DEFAULT_WIDTH = ["model.channels=64", "model.channel_mults=[1,2,2]", "model.codebook_bits=10"]
CADENCES = {
    "stress": {"preset": "smoke", "overrides": ["train.epochs=6"], "every": 10, "repeats": 5},
    "small": {"preset": "small", "overrides": ["train.epochs=1"], "every": 10, "repeats": 3},
    "large": {
        "preset": "small", "every": 3, "repeats": 2,
        "overrides": [*DEFAULT_WIDTH, "train.epochs=1", "train.batch_size=1", "data.num_samples=10", "train.val_batches=1",
                      "stage2.batch_size=1"],
    },
}
# Targets of issue 17: the job's ratio over bare (and not above Lightning's) by cadence; at the
# large model, the job's blocking per checkpoint against Lightning's.
RATIO_TARGET = {"stress": 1.08, "small": 1.02}
BLOCKING_SHARE_TARGET = {"large": 0.10}

JOB_SAVES: list[tuple[str, float]] = []  # (reason, seconds) of each CheckpointManager.save call


def _timed_save(original):
    @functools.wraps(original)
    def save(self, reason, val_loss=None):
        started = time.perf_counter()
        try:
            return original(self, reason, val_loss)
        finally:
            JOB_SAVES.append((reason, time.perf_counter() - started))

    return save


CheckpointManager.save = _timed_save(CheckpointManager.save)


class EpochBatches(torch.utils.data.IterableDataset):
    """The job's batches in the job's order (epoch_order of the seed and epoch), one epoch per
    iteration, for a DataLoader with batch_size=None."""

    def __init__(self, cfg, dataset: VideoDataset, indices, shuffle: bool):
        self.cfg, self.dataset, self.indices, self.shuffle = cfg, dataset, indices, shuffle
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.indices) // self.cfg.train.batch_size)

    def __iter__(self):
        size = self.cfg.train.batch_size
        order = epoch_order(self.cfg.seed, self.epoch, len(self.indices)) if self.shuffle else np.arange(len(self.indices))
        self.epoch += 1
        for start in range(0, len(order), size):
            yield self.dataset.get(self.indices[order[start : start + size]])[0]


class Tokenizer(pl.LightningModule):
    """The job's tokenizer, loss, AdamW and schedule as a LightningModule."""

    def __init__(self, cfg, total_steps: int):
        super().__init__()
        self.cfg, self.total_steps = cfg, total_steps
        self.model = initial_tokenizer(cfg)

    def training_step(self, videos, batch_idx):
        loss, _ = compute_loss(self.model(videos), videos, self.cfg.model)
        return loss

    def validation_step(self, videos, batch_idx):
        self.model(videos)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model, self.cfg, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PhaseTimer(Callback):
    """Wall and process CPU time from the first step to the end of training."""

    def on_train_start(self, trainer, pl_module):
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, pl_module):
        self.seconds, self.cpu = time.perf_counter() - self.started, time.process_time() - self.cpu_started


class TimedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint, with the time its per-batch hook (where it saves and prunes, on the
    training thread) takes when it saves."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocking: list[float] = []

    def on_train_batch_end(self, trainer, *args, **kwargs):
        started, saved = time.perf_counter(), self._last_global_step_saved
        super().on_train_batch_end(trainer, *args, **kwargs)
        if self._last_global_step_saved != saved:
            self.blocking.append(time.perf_counter() - started)


def lightning_run(cfg, dataset: VideoDataset, total_steps: int, every: int, uri: str, s3: S3Server) -> dict:
    train_indices, val_indices = dataset.split("train"), dataset.split("val")
    if cfg.train.val_batches:
        val_indices = val_indices[: cfg.train.val_batches * cfg.train.batch_size]
    module = Tokenizer(cfg, total_steps)
    checkpoint = TimedCheckpoint(
        dirpath=uri, every_n_train_steps=every, save_top_k=cfg.checkpoint.keep_last, monitor="step", mode="max",
    )
    timer = PhaseTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=cfg.train.epochs, gradient_clip_val=cfg.optim.grad_clip,
        callbacks=[timer, checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tempfile.gettempdir(),
    )
    loader = torch.utils.data.DataLoader  # batch_size=None: the dataset yields whole batches
    server_cpu = s3.cpu_seconds()
    with ThreadCPU() as threads:
        trainer.fit(
            module,
            loader(EpochBatches(cfg, dataset, train_indices, shuffle=True), batch_size=None),
            loader(EpochBatches(cfg, dataset, val_indices, shuffle=False), batch_size=None),
        )
    return {
        "loop": timer.seconds, "cpu": timer.cpu, "blocking": checkpoint.blocking, "checkpoints": len(checkpoint.blocking),
        "model": module.model, "threads": threads.seconds, "server_cpu": s3.cpu_seconds() - server_cpu,
    }


def job_run(cfg, data_template: Path, work: Path, s3: S3Server, bucket: str) -> dict:
    """The job's run; its blocking is that of the saves on the cadence: the final save also waits
    for its commit (the process is about to end), reported apart."""
    JOB_SAVES.clear()
    run = full_job(cfg, data_template, work, s3, bucket)
    run["checkpoints"] = len(JOB_SAVES)
    run["blocking"] = [seconds for reason, seconds in JOB_SAVES if reason == "steps"]
    run["final_save"] = sum(seconds for reason, seconds in JOB_SAVES if reason == FINAL)
    return run


def per_checkpoint_by_thread(runs: list[dict]) -> dict[str, float]:
    names = {name for r in runs for name in r["threads"]} - {"bench-sampler"}
    return {name: round(1000 * median([r["threads"].get(name, 0.0) / r["checkpoints"] for r in runs]), 1) for name in sorted(names)}


def same_model(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def request_summary(requests: list[tuple[str, str]], checkpoints: int, checkpoint_marker: str) -> dict:
    """Requests per checkpoint: all of a run's, and those for checkpoints: on a checkpoint path,
    listing one (the prefix is in the query) or deleting keys in bulk (only pruning does)."""
    on_checkpoints = [
        (m, p) for m, p in requests
        if checkpoint_marker in unquote(p) or (m == "POST" and "delete" in urlsplit(p).query)
    ]
    return {
        "per_checkpoint": round(len(requests) / checkpoints, 2),
        "checkpoint_paths_per_checkpoint": round(len(on_checkpoints) / checkpoints, 2),
        "by_method": dict(Counter(m for m, _ in requests)),
        "total": len(requests),
    }


def bench_cadence(name: str, plan: dict, repeats: int, threads: int, s3: S3Server, work: Path) -> None:
    every = plan["every"]
    # The job's monitoring as its preset sets it (smoke: a heartbeat every 2 s, progress.json every
    # 0.5 s; small: 10 s and 5 s), live files paced by storage.live_upload_seconds: what a user runs.
    overrides = [
        *plan["overrides"], "stage2.epochs=0", f"checkpoint.every_steps={every}", "checkpoint.every_epochs=0",
        "checkpoint.every_minutes=0",
    ]
    setup = set_up(plan["preset"], overrides, name, "bench-lightning", threads, torch.device("cpu"), s3, work)
    cfg, total_steps, data_template, dataset, bucket = (
        setup.cfg, setup.total_steps, setup.data_template, setup.dataset, setup.bucket
    )

    variants = ["bare", "job", "lightning"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    requests: dict[str, list[dict]] = {"job": [], "lightning": []}
    same = {}
    for k in range(repeats):
        for which in variants if k % 2 == 0 else variants[::-1]:  # ABBA: drift in the machine's load hits all
            note(f"{name}: repeat {k + 1}/{repeats}, {which} ({total_steps} steps, checkpoint every {every})")
            sent = len(s3.requests())
            if which == "bare":
                runs["bare"].append(bare_loop(cfg, dataset, torch.device("cpu"), total_steps))
                continue
            if which == "job":
                run = job_run(cfg, data_template, work, s3, bucket)
                marker = "checkpoints/"
            else:
                run = lightning_run(cfg, dataset, total_steps, every, f"s3://{bucket}/lightning-run-{uuid.uuid4().hex[:8]}", s3)
                marker = "lightning-run-"
            runs[which].append(run)
            requests[which].append(request_summary(s3.requests()[sent:], run["checkpoints"], marker))
        if not same:
            bare_model = runs["bare"][0]["model"]
            same = {"job": same_weights(bare_model, runs["job"][0]["final_model"]),
                    "lightning": same_model(bare_model, runs["lightning"][0]["model"])}
        for run in (runs["bare"][-1], runs["lightning"][-1]):
            run.pop("model", None)

    bare_loop_s, bare_cpu = median([r["loop"] for r in runs["bare"]]), median([r["cpu"] for r in runs["bare"]])
    result: dict[str, dict] = {}
    for which in ("job", "lightning"):
        rs = runs[which]
        checkpoints = rs[0]["checkpoints"]
        blocking = [median(r["blocking"]) for r in rs]  # per run, the median save on the cadence
        loops, cpus = [r["loop"] for r in rs], [r["cpu"] for r in rs]
        result[which] = {
            "ratio": round(median(loops) / bare_loop_s, 3),
            "pair_ratios": spread([x / b["loop"] for x, b in zip(loops, runs["bare"])], 3),
            "checkpoints": checkpoints,
            "blocking_ms_per_checkpoint": round(1000 * median(blocking), 2),
            "blocking_ms_spread": spread([1000 * b for b in blocking], 2),
            "wall_ms_per_checkpoint": round(1000 * (median(loops) - bare_loop_s) / checkpoints, 1),
            "cpu_ms_per_checkpoint": round(1000 * (median(cpus) - bare_cpu) / checkpoints, 1),
            "loop_seconds": spread(loops, 3),
            "requests": requests[which][len(requests[which]) // 2],
            "same_final_weights_as_bare": same[which],
            # Less disturbed by the load than wall time: CPU time by thread, per checkpoint, over the
            # whole call (the job: train() with setup, its plot worker among the ended child
            # processes; Lightning: fit()); medians of the repeats. The store's own CPU per checkpoint
            # is apart: a real bucket is on another machine.
            "cpu_ms_per_checkpoint_by_thread": per_checkpoint_by_thread(rs),
            "server_cpu_ms_per_checkpoint": round(1000 * median([r["server_cpu"] / r["checkpoints"] for r in rs]), 1),
            "ratio_of_fastest": round(min(loops) / min(r["loop"] for r in runs["bare"]), 3),
        }
    result["job"]["final_save_ms"] = round(1000 * median([r["final_save"] for r in runs["job"]]), 1)
    job, light = result["job"], result["lightning"]
    targets = {}
    if name in RATIO_TARGET:
        targets["ratio_at_most"] = RATIO_TARGET[name]
        targets["met"] = job["ratio"] <= RATIO_TARGET[name] and job["ratio"] <= light["ratio"]
    if name in BLOCKING_SHARE_TARGET:
        share = job["blocking_ms_per_checkpoint"] / light["blocking_ms_per_checkpoint"]
        targets.update(blocking_share_of_lightning=round(share, 4), share_at_most=BLOCKING_SHARE_TARGET[name],
                       met=share <= BLOCKING_SHARE_TARGET[name])
    emit({
        "bench": "vs_lightning",
        "cadence": name,
        "preset": plan["preset"],
        "overrides": plan["overrides"],
        "what": "training phase over a bare loop of the same steps: the job (train() on s3://) and Lightning "
        "(Trainer.fit, ModelCheckpoint to s3:// through fsspec), one moto server, ABBA repeats",
        "steps": total_steps,
        "every_steps": every,
        "bare_seconds": spread([r["loop"] for r in runs["bare"]], 3),
        "bare_cpu_seconds": round(bare_cpu, 3),
        "job": job,
        "lightning": light,
        "job_over_lightning": round(job["ratio"] / light["ratio"], 3),
        "targets": targets,
        "repeats": repeats,
        "lightning_version": pl.__version__,
        "s3": "moto server on 127.0.0.1, separate process; requests counted at the server",
    }, torch_threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cadences", nargs="+", default=list(CADENCES), choices=list(CADENCES))
    parser.add_argument("--repeats", type=int, help="repeats of each variant (default: per cadence)")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-lightning-") as tmp, S3Server(Path(tmp) / "requests.log") as s3:
        work = Path(tmp)
        job_logging_to(work / "job-log.jsonl")
        # Warm-up, not measured: one short run of each pays the process's one-time costs.
        warm, warm_data, bucket = warm_up(s3, work)
        lightning_run(warm, VideoDataset(warm_data, warm.data), steps_per_epoch(warm), 10, f"s3://{bucket}/lightning", s3)
        for name in args.cadences:
            bench_cadence(name, CADENCES[name], args.repeats or CADENCES[name]["repeats"], threads, s3, work)


if __name__ == "__main__":
    main()
