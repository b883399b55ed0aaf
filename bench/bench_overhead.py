"""What the job's safety costs: the full job against a bare training loop, one JSON line per preset.

    python bench/bench_overhead.py [--presets smoke small] [--epochs N] [--repeats N] [--every-steps N]

Same model, data, batches and number of steps in both, in this one process:

- bare: the model, AdamW and schedule TokenizerTask builds (initial_tokenizer, build_optimizer),
  then per epoch the job's batch order (epoch_order) through VideoDataset.get, forward,
  compute_loss, backward, clip, AdamW step, scheduler step, and the same validation pass at each
  epoch end (validation is training work, not safety). Nothing else.
- full: job.training.loop.train(cfg, store), the tokenizer stage alone (stage2.epochs=0), on an
  s3:// run folder served by a moto S3 server on 127.0.0.1 (its own process, as a real bucket
  is elsewhere), checkpoints every --every-steps
  steps (plus the preset's per-epoch ones and the final one), heartbeat every 1 s,
  progress.json every 1 s, JSON logs (to a file instead of stdout), plots (drawn by the plot
  worker process each run starts), metrics, background uploads (live files paced by
  storage.live_upload_seconds, as in the job); then store.flush(). For smoke also on a local
  run folder (no uploads), to separate the uploads' share.

The ratio compares the training phase only: the bare loop's time against the time the job
spends in Trainer.run (first step to final checkpoint, timed by wrapping that method).
What comes before (preflight against the bucket, the checkpoint search, opening and verifying
the dataset, building the model) and after (waiting for plots, flushing the upload backlog) is
reported separately, as is the ratio including all of it. The dataset is generated beforehand
into each run's folder, as a resumed run finds it, so its generation is in neither.

One short job first pays the process's one-time costs (imports, the S3 client's first
connection), and a few bare steps build oneDNN's kernels for the shapes. Then
each repeat runs the variants back to back (ABBA order); "ratio" is of the medians,
"ratio_of_fastest" of the fastest runs (least disturbed by other processes on a shared
machine). After the first repeat the two final models are compared: the same weights mean the
same arithmetic was done. To say where the extra time goes, the job's methods are timed
(Trainer.save, Trainer.step, TokenizerTask.validate, ...; see TIMED), each thread's CPU seconds are read from /proc, and so are
the CPU seconds of the job's helper process (the plot worker, among "ended child processes")
and of the S3 server, which shares this machine's cores
with the job as a real bucket would not. bench_contention.py says what such work on another
core costs the training step here. Every step is timed too ("step_ms"): the steps between
checkpoints against the bare loop's, and a checkpoint's cost to the training thread (its
save() call plus what the step right after it, while the commit runs, loses).
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from common import KeepLogHandlers, S3Server, ThreadCPU, emit, job_logging_to, median, note, spread, tokenizer_step
from safetensors.torch import load_file

import job.training.loop
from job.config import Config, build_config, steps_per_epoch
from job.data.dataset import VideoDataset
from job.data.shards import generate_dataset
from job.models.tokenizer import initial_tokenizer
from job.runtime.device import pick_device
from job.storage import Layout, RunStore
from job.training.loop import Trainer, train
from job.training.optim import build_optimizer
from job.training.order import epoch_order
from job.training.tasks.tokenizer import TokenizerTask

TARGET = 1.05
# Per preset: epochs and repeats that keep `make bench` within its budget on 2 cores.
PLAN = {"smoke": {"epochs": 6, "repeats": 3}, "small": {"epochs": 1, "repeats": 3}, "default": {"epochs": 1, "repeats": 1}}
WARMUP_STEPS = 5


class Timers:
    """Seconds spent in named calls, accumulated since the last ``reset()``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.marks: dict[str, float] = {}
        self.sequence: list[tuple[str, float]] = []  # (name, seconds) of each call of a ``logged`` method

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.marks.clear()
        self.sequence.clear()

    def wrap(self, owner: object, name: str, label: str, mark: bool = False, logged: bool = False) -> None:
        """Time ``owner.name`` (a method of a class, or a function of the module that calls it)
        under ``label``. A name the job no longer has fails here, not as a silent zero later."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            if mark:
                self.marks[f"{label}.start"] = started
                self.marks[f"{label}.cpu_start"] = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                if mark:
                    self.marks[f"{label}.end"] = ended
                    self.marks[f"{label}.cpu_end"] = time.process_time()
                self.seconds[label] = self.seconds.get(label, 0.0) + ended - started
                self.calls[label] = self.calls.get(label, 0) + 1
                if logged:
                    self.sequence.append((label, ended - started))

        setattr(owner, name, timed)


# What is timed, by the label it is reported under (the names of the job's methods before
# Trainer and TokenizerTask split the old TrainingLoop, so that results stay comparable):
# (owner, attribute, label). The setup functions are wrapped in job.training.loop, whose
# train() calls them by those names.
TIMED_LOOP = (
    (Trainer, "run", "run"),  # the training phase: first step to final checkpoint
    (Trainer, "step", "train_step"),
    (TokenizerTask, "validate", "validate"),
    (Trainer, "save", "save"),  # snapshot + background commit start + reconstruction picture
    (Trainer, "report_batch", "report_batch"),
    (TokenizerTask, "picture", "plot_reconstructions"),  # its forward pass; the plot worker renders
    (Trainer, "finish_epoch", "finish_epoch"),  # includes validate and the epoch-end save
)
TIMED_SETUP = (
    (job.training.loop, "preflight", "preflight"),
    (job.training.loop, "prepare_dataset_in_turn", "prepare_dataset_in_turn"),
    (TokenizerTask, "__init__", "build_training"),  # the model
)
SETUP_PARTS = tuple(label for _, _, label in TIMED_SETUP)
TIMERS = Timers()
for _owner, _name, _label in TIMED_LOOP:
    TIMERS.wrap(_owner, _name, _label, mark=_label == "run", logged=_label in ("train_step", "save"))
for _owner, _name, _label in TIMED_SETUP:
    TIMERS.wrap(_owner, _name, _label)


def bare_loop(cfg, dataset: VideoDataset, device: torch.device, total_steps: int, max_steps: int = 0) -> dict:
    """The training arithmetic and nothing else."""
    model = initial_tokenizer(cfg).to(device)  # as TokenizerTask builds it
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    train_indices, val_indices = dataset.split("train"), dataset.split("val")
    if cfg.train.val_batches:
        val_indices = val_indices[: cfg.train.val_batches * cfg.train.batch_size]
    parts = {"train_step": 0.0, "validate": 0.0}
    steps: list[float] = []
    with ThreadCPU() as threads:
        started, cpu_started = time.perf_counter(), time.process_time()
        bare_epochs(cfg, dataset, model, optimizer, scheduler, train_indices, val_indices, parts, steps, max_steps)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"loop": seconds, "cpu": cpu, "threads": threads.seconds, "parts": parts, "steps": steps, "model": model}


def bare_epochs(
    cfg, dataset, model, optimizer, scheduler, train_indices, val_indices, parts, steps, max_steps=0
) -> None:
    batch_size = cfg.train.batch_size
    for epoch in range(cfg.train.epochs):
        step_started = time.perf_counter()
        order = epoch_order(cfg.seed, epoch, len(train_indices))
        for start in range(0, len(order), batch_size):
            if max_steps and start // batch_size >= max_steps:
                return
            began = time.perf_counter()
            videos, _ = dataset.get(train_indices[order[start : start + batch_size]])
            tokenizer_step(model, optimizer, scheduler, videos, cfg)
            steps.append(time.perf_counter() - began)
        val_started = time.perf_counter()
        parts["train_step"] += val_started - step_started
        model.eval()
        with torch.no_grad():
            for start in range(0, len(val_indices), batch_size):
                videos, _ = dataset.get(val_indices[start : start + batch_size])
                model(videos)
        model.train()
        parts["validate"] += time.perf_counter() - val_started


def full_job(cfg, data_template: Path, work: Path, s3: S3Server | None, bucket: str) -> dict:
    """train() on a fresh run whose working copy already holds the dataset, then the upload
    flush: an s3:// run folder, or with ``s3=None`` a local one (no uploads at all)."""
    folder = work / f"run-{uuid.uuid4().hex[:8]}"
    shutil.copytree(data_template, folder / Layout.data)
    if s3 is not None:
        store = RunStore.for_job(f"s3://{bucket}/{folder.name}", folder, cfg.storage)
    else:
        store = RunStore.for_job(str(folder), None, cfg.storage)
    TIMERS.reset()
    server_cpu = s3.cpu_seconds() if s3 else 0.0
    started = time.perf_counter()
    try:
        with KeepLogHandlers(), ThreadCPU() as threads:
            train(cfg, store)
        server_cpu = s3.cpu_seconds() - server_cpu if s3 else 0.0
        trained = time.perf_counter()
        store.flush(cfg.storage.flush_seconds)
        flushed = time.perf_counter()
    finally:
        store.close()
    m = TIMERS.marks
    latest = store.read_json(Layout.latest)
    return {
        "loop": m["run.end"] - m["run.start"],
        "cpu": m["run.cpu_end"] - m["run.cpu_start"],
        "before_loop": m["run.start"] - started,
        "after_loop": trained - m["run.end"],
        "flush": flushed - trained,
        "total": flushed - started,
        "parts": dict(TIMERS.seconds),
        "sequence": list(TIMERS.sequence),
        "threads": threads.seconds,
        "server_cpu": server_cpu,
        "calls": dict(TIMERS.calls),
        "folder": folder,
        "final_model": folder / Layout.checkpoint_file(latest["checkpoint"], "model.safetensors"),
    }


def per_checkpoint_ms(full_runs: list[dict], bare_runs: list[dict]) -> dict:
    """Where a checkpoint's cost to the training thread goes: its ``save()`` call, and the step
    right after it (the commit runs in the background then) against the other steps and the
    bare loop's, as medians over every run, in milliseconds."""
    first_after, others, saves = [], [], []
    for run in full_runs:
        after_save = False
        for name, seconds in run["sequence"]:
            if name == "save":
                saves.append(seconds)
                after_save = True
            else:
                (first_after if after_save else others).append(seconds)
                after_save = False
    bare = [s for run in bare_runs for s in run["steps"]]
    typical = median(bare)
    ms = {
        "save": 1000 * median(saves),
        "first_step_after_save": 1000 * median(first_after),
        "other_steps": 1000 * median(others),
        "bare_steps": 1000 * typical,
    }
    ms["per_checkpoint"] = ms["save"] + ms["first_step_after_save"] - ms["other_steps"]
    # Medians hide the rare slow step; these sums (per run, over the bare loop's median step) do not.
    runs = len(full_runs)
    ms["excess_per_run_after_saves"] = 1000 * (sum(first_after) - len(first_after) * typical) / runs
    ms["excess_per_run_other_steps"] = 1000 * (sum(others) - len(others) * typical) / runs
    ms["slowest_other_steps"] = [round(1000 * s, 1) for s in sorted(others)[-5:]]
    return {k: v if isinstance(v, list) else round(v, 2) for k, v in ms.items()}


def same_weights(model: torch.nn.Module, path: Path) -> bool:
    saved = load_file(str(path))
    state = model.state_dict()
    return set(saved) == set(state) and all(torch.equal(saved[k], state[k].cpu()) for k in state)


def rounded(values: dict[str, float], digits: int = 3) -> dict[str, float]:
    return {k: round(v, digits) for k, v in values.items()}


@dataclass
class Setup:
    """What the repeats of one bench of the job's loop share."""

    cfg: Config
    device: torch.device
    total_steps: int
    data_template: Path
    dataset: VideoDataset
    bucket: str


def set_up(
    preset: str, overrides: list[str], name: str, bucket_prefix: str, threads: int, device: torch.device | None,
    s3: S3Server, work: Path,
) -> Setup:
    """Before the first repeat: the config, torch's threads as a fresh `python -m job` process
    would use them, the dataset, a fresh bucket, and oneDNN's primitives for these shapes (a few
    bare steps, not measured). ``device``: None for the job's own choice."""
    cfg = build_config(preset, None, overrides)
    device = device or pick_device(cfg)
    torch.set_num_threads(cfg.train.threads or threads)
    total_steps = steps_per_epoch(cfg) * cfg.train.epochs
    data_template = work / f"data-{name}"
    generate_dataset(cfg.data, data_template)
    dataset = VideoDataset(data_template, cfg.data)
    bucket = s3.create_bucket(f"{bucket_prefix}-{name}-{uuid.uuid4().hex[:6]}")
    bare_loop(cfg, dataset, device, total_steps, max_steps=WARMUP_STEPS)
    return Setup(cfg, device, total_steps, data_template, dataset, bucket)


def warm_up(s3: S3Server, work: Path) -> tuple[Config, Path, str]:
    """Not measured: one short job pays the process's one-time costs (matplotlib's font cache,
    the S3 client's first connection, lazy imports), which a long run pays once. Returns its
    config, dataset and bucket for a bench that warms up more than the job."""
    warm = build_config("smoke", None, ["train.epochs=1", "stage2.epochs=0", "checkpoint.every_steps=10"])
    generate_dataset(warm.data, work / "data-warmup")
    bucket = s3.create_bucket("bench-warmup")
    full_job(warm, work / "data-warmup", work, s3, bucket)
    return warm, work / "data-warmup", bucket


def bench_preset(
    preset: str, epochs: int, repeats: int, every_steps: int, threads: int, s3: S3Server, work: Path, local: bool
) -> None:
    overrides = [
        f"train.epochs={epochs}",
        "stage2.epochs=0",  # the tokenizer stage alone, which is what the bare loop trains
        f"checkpoint.every_steps={every_steps}",
        "monitor.heartbeat_seconds=1",
        "monitor.progress_every_seconds=1",
    ]
    setup = set_up(preset, overrides, preset, "bench-overhead", threads, None, s3, work)
    cfg, device, total_steps, data_template, dataset, bucket = (
        setup.cfg, setup.device, setup.total_steps, setup.data_template, setup.dataset, setup.bucket
    )

    variants = ["bare", "s3", *(["local"] if local else [])]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    identical = None
    for k in range(repeats):
        order = variants if k % 2 == 0 else variants[::-1]  # ABBA: drift in the machine's load hits both
        for which in order:
            note(f"{preset}: repeat {k + 1}/{repeats}, {which} ({total_steps} steps)")
            if which == "bare":
                runs["bare"].append(bare_loop(cfg, dataset, device, total_steps))
            else:
                runs[which].append(full_job(cfg, data_template, work, s3 if which == "s3" else None, bucket))
        if identical is None:
            identical = same_weights(runs["bare"][0]["model"], runs["s3"][0]["final_model"])
        runs["bare"][-1].pop("model")
        for which in variants[1:]:
            shutil.rmtree(runs[which][-1]["folder"], ignore_errors=True)

    loop = {v: [r["loop"] for r in runs[v]] for v in variants}
    ratio = median(loop["s3"]) / median(loop["bare"])
    ratio_min = min(loop["s3"]) / min(loop["bare"])
    pairs = [f / b for f, b in zip(loop["s3"], loop["bare"])]
    mid = sorted(range(repeats), key=lambda i: loop["s3"][i])[(repeats - 1) // 2]  # the median s3 run, for its split
    f = runs["s3"][mid]
    record = {
        "bench": "overhead",
        "preset": preset,
        "what": "training phase of train() on an s3:// run (checkpoints, heartbeat, progress, logs, plots, "
        "uploads) / the same steps in a bare loop",
        "ratio": round(ratio, 3),
        "target": TARGET,
        "met": ratio <= TARGET,
        "pair_ratios": spread(pairs, 3),
        "ratio_of_fastest": round(ratio_min, 3),  # least disturbed by other processes on the machine
        "steps": total_steps,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "checkpoint_every_steps": every_steps,
        "checkpoints_saved": f["calls"].get("save"),
        "same_final_weights": identical,
        # the training thread's time per checkpoint, and whether the steps between checkpoints
        # run at the bare loop's speed (the rest of the overhead is then the checkpoints')
        "step_ms": per_checkpoint_ms(runs["s3"], runs["bare"]),
        "bare_seconds": spread(loop["bare"], 3),
        "full_loop_seconds": spread(loop["s3"], 3),
        "bare_ms_per_step": round(1000 * median(loop["bare"]) / total_steps, 2),
        "full_ms_per_step": round(1000 * median(loop["s3"]) / total_steps, 2),
        # process CPU seconds (all threads) during the loop: what the background work adds
        "bare_cpu_seconds": round(median([r["cpu"] for r in runs["bare"]]), 3),
        "full_cpu_seconds": round(median([r["cpu"] for r in runs["s3"]]), 3),
        # where the median full run's loop went; finish_epoch includes validate and the epoch-end
        # save, save includes the reconstruction plot's forward pass
        "full_loop_split_seconds": rounded({k: v for k, v in f["parts"].items() if k not in ("run", *SETUP_PARTS)}),
        "bare_split_seconds": rounded(runs["bare"][mid]["parts"]),
        # CPU seconds by thread over the whole train() call (setup and teardown included) and the bare loop
        "full_cpu_by_thread": f["threads"],
        # the endpoint shares this machine's cores with the job, as a real bucket would not
        "s3_server_cpu_seconds": round(f["server_cpu"], 2),
        "bare_cpu_by_thread": runs["bare"][mid]["threads"],
        "setup_seconds": {
            "before_loop": round(f["before_loop"], 3),
            "preflight": round(f["parts"].get("preflight", 0.0), 3),
            "open_and_verify_dataset": round(f["parts"].get("prepare_dataset_in_turn", 0.0), 3),
            "build_model": round(f["parts"].get("build_training", 0.0), 3),
            "after_loop": round(f["after_loop"], 3),
            "upload_flush": round(f["flush"], 3),
        },
        "ratio_including_setup": round(median([x["total"] for x in runs["s3"]]) / median(loop["bare"]), 3),
        "repeats": repeats,
        "s3": "moto server on 127.0.0.1, separate process",
    }
    if local:
        record["ratio_local_run_folder"] = round(median(loop["local"]) / median(loop["bare"]), 3)
        record["local_loop_seconds"] = spread(loop["local"], 3)
    emit(record, torch_threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["smoke", "small"], choices=list(PLAN))
    parser.add_argument("--epochs", type=int, help="epochs per run (default: per preset, see PLAN)")
    parser.add_argument("--repeats", type=int, help="bare/full pairs per preset (default: per preset)")
    parser.add_argument("--every-steps", type=int, default=10, help="checkpoint.every_steps of the full job")
    parser.add_argument(
        "--local", choices=("on", "off", "smoke"), default="smoke",
        help="also time the full job on a local run folder (no uploads): for all presets, none, or smoke only",
    )
    args = parser.parse_args()

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp, S3Server() as s3:
        work = Path(tmp)
        job_logging_to(work / "job-log.jsonl")
        # Warm-up, not measured: one short job pays the process's one-time costs (matplotlib's font
        # cache, the S3 client's first connection, lazy imports), which a long run pays once.
        warm_up(s3, work)
        for preset in args.presets:
            plan = PLAN[preset]
            bench_preset(
                preset, args.epochs or plan["epochs"], args.repeats or plan["repeats"], args.every_steps, threads, s3, work,
                local=args.local == "on" or (args.local == "smoke" and preset == "smoke"),
            )


if __name__ == "__main__":
    main()
