"""Resume latency: from process start to the first resumed step, local and s3:// run folders.

    python bench/bench_resume.py [--repeats N] [--no-default]

1. A `small` run is trained into a local folder with a checkpoint every 10 steps and stopped
   with SIGTERM after about 25 steps (it saves a checkpoint and exits 143): a preempted run.
2. End to end, --repeats times per folder: `python -m job train --preset small --set
   train.epochs=1` on a fresh copy of that run (local: a copied folder; s3: the folder uploaded
   to a fresh prefix of a bucket on a moto S3 server on 127.0.0.1, and an empty --cache-dir, as
   a new container has). The bench stamps the time before Popen and each JSON log line as it
   arrives: `train.resumed` (checkpoint found, downloaded, verified, restored; dataset ready) and
   the first `train.progress` (the first resumed step done). Then the child is killed. The first
   step of a new process is slower than the steady state (oneDNN builds its kernels for the
   shapes it meets), so it is reported apart.
3. The split of that time, measured separately (medians of --repeats):
   - imports: `python -c pass` (interpreter start) and the job's imports, timed inside a fresh
     interpreter (job.cli and job.training.loop; for s3 also s3fs, which a local run never
     imports);
   - in this process, in the job's order, with a new RunStore and an empty cache: preflight
     (the run URI's write/read/delete probe; for s3 it also opens the connection), the
     checkpoint search (listing), download (every file of the newest checkpoint through the
     RunStore), verify (sha256 against the manifest), building the model (the model, AdamW and
     schedule TokenizerTask builds), load (safetensors decode, JSON, Checkpoint.restore() of
     every stateful part), and the dataset (downloaded when remote, opened with hash
     verification);
   - other: what remains of the time to `train.resumed` (logging and config setup, the attempt
     counter, progress.json, threads); measurement noise can make it slightly negative.
4. The same download / verify / load split for a checkpoint of the `default` model (5 M
   parameters, 60 MB with the AdamW moments), written by the job's CheckpointManager from a
   freshly built model (not trained), local and s3.

Ratios s3 / local are reported for the end-to-end time and each part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch
from common import ROOT, S3Server, emit, job_env, job_logging_to, median, note, spread
from safetensors.torch import load as load_tensors

from job.checkpoints.format import MODEL_FILE, STATE_FILE, RNGState, decode_state
from job.checkpoints.manager import CheckpointManager
from job.checkpoints.reader import Checkpoint, CheckpointReader
from job.checkpoints.train_state import TrainState
from job.config import build_config, steps_per_epoch
from job.data.dataset import prepare_dataset
from job.models.tokenizer import initial_tokenizer
from job.storage import Layout, RunStore
from job.training.optim import build_optimizer

PRESET = "small"
STOP_AFTER_STEPS = 25  # the first attempt is stopped with SIGTERM after this many steps
RESUME_EPOCHS = 1
MANIFEST = Layout.checkpoint_manifest_file


# --- end to end ----------------------------------------------------------------------------


def run_until_first_step(command: list[str], env: dict[str, str], timeout: float = 300) -> dict[str, float]:
    """Start ``command``; return seconds from just before Popen to its first log line,
    `train.resumed` and the first `train.progress`; then kill it."""
    stamps: dict[str, float] = {}
    lines: list[str] = []
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            now = time.perf_counter() - started
            lines.append(line)
            try:
                event = json.loads(line).get("event")
            except ValueError:
                continue
            stamps.setdefault("first_log_line", now)
            if event in ("train.resumed", "train.progress"):
                stamps.setdefault(event, now)
            if event == "train.progress":
                break
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
    if "train.progress" not in stamps or "train.resumed" not in stamps:
        raise RuntimeError("the resumed run did not report a resumed step:\n" + "".join(lines[-20:]))
    return stamps


def preempted_run(folder: Path, env: dict[str, str]) -> None:
    """A run with checkpoints every 10 steps, stopped by SIGTERM (which saves one more)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", "train", "--preset", PRESET, "--run-uri", str(folder),
         "--set", "checkpoint.every_steps=10", "--set", "train.log_every_batches=1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    steps = 0
    for line in proc.stdout:
        if '"train.progress"' in line:
            steps += 1
            if steps == STOP_AFTER_STEPS:
                proc.send_signal(signal.SIGTERM)
    if proc.wait(timeout=120) != 143:
        raise RuntimeError(f"the first attempt ended with exit {proc.returncode}, expected 143 after SIGTERM")


def startup_seconds(env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - started


IMPORT_TIMER = """
import time
t0 = time.perf_counter()
import job.cli, job.training.loop
t1 = time.perf_counter()
import s3fs
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def import_seconds(env: dict[str, str]) -> dict[str, float]:
    """The job's imports in a fresh interpreter: local runs need job.cli and job.training.loop,
    s3 runs s3fs too."""
    out = subprocess.run([sys.executable, "-c", IMPORT_TIMER], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job_s, s3fs_s = map(float, out.stdout.split())
    return {"local": job_s, "s3": job_s + s3fs_s}


# --- in-process split ----------------------------------------------------------------------


def timed(action):
    started = time.perf_counter()
    value = action()
    return value, time.perf_counter() - started


def checkpoint_split(uri: str, cache: Path, cfg, total_steps: int, dataset: bool = True) -> dict[str, float]:
    """What a resuming job does before its first step, in its order, with an empty cache."""
    store = RunStore(uri, cache, connect_seconds=cfg.storage.connect_seconds)
    parts: dict[str, float] = {}
    try:
        _, parts["preflight"] = timed(store.preflight)
        names, parts["list"] = timed(CheckpointReader(store).names)
        name = names[-1]

        def download() -> tuple[dict, dict[str, bytes]]:
            manifest = json.loads(store.read_bytes(Layout.checkpoint_file(name, MANIFEST)))
            return manifest, {f: store.read_bytes(Layout.checkpoint_file(name, f)) for f in manifest["files"]}

        (manifest, blobs), parts["download"] = timed(download)
        ok, parts["verify"] = timed(
            lambda: all(hashlib.sha256(blobs[f]).hexdigest() == e["sha256"] for f, e in manifest["files"].items())
        )
        if not ok:
            raise RuntimeError(f"{uri}: {name} does not verify")
        stateful, parts["build_model"] = timed(lambda: built(cfg, total_steps))

        def load() -> None:
            optimizer, rng, state = decode_state(blobs[STATE_FILE])
            checkpoint = Checkpoint(
                name=name, manifest=manifest, model=load_tensors(blobs[MODEL_FILE]), optimizer=optimizer, rng=rng,
                state=state,
            )
            checkpoint.restore(stateful)

        _, parts["load"] = timed(load)
        parts["bytes"] = sum(len(b) for b in blobs.values())
        if dataset:
            _, parts["dataset"] = timed(lambda: prepare_dataset(cfg, store))
    finally:
        store.close()
    # The job's own call, as a cross-check of list + download + verify + decode (a new store,
    # an empty cache: it opens its own connection).
    store = RunStore(uri, cache.with_name(cache.name + "-check"))
    try:
        _, parts["load_newest_valid"] = timed(CheckpointReader(store).load_newest_valid)
    finally:
        store.close()
    return parts


def built(cfg, total_steps: int) -> dict:
    """The stateful parts of a fresh run on the CPU, as train() builds them (TokenizerTask's model,
    AdamW and schedule; the random states; the train state)."""
    model = initial_tokenizer(cfg)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": RNGState(), "train": TrainState()}


def default_checkpoint(folder: Path) -> None:
    """A checkpoint of the default model with AdamW moments, through the job's CheckpointManager."""
    cfg = build_config("default")
    parts = built(cfg, 1000)
    for p in parts["model"].parameters():
        p.grad = torch.zeros_like(p)
    parts["optimizer"].step()  # creates the moments, as any trained run has them
    store = RunStore(str(folder))
    manager = CheckpointManager(
        store, stage=Layout.tokenizer, cadence=cfg.checkpoint, parts=parts, extra={"config": cfg.to_dict()},
        inventory=CheckpointReader(store, Layout.tokenizer).inventory(),
    )
    try:
        manager.save("bench")  # step 0, from the fresh TrainState
        manager.wait()
    finally:
        manager.close()
    store.write_json(Layout.config, cfg.to_dict())


# --- the bench -----------------------------------------------------------------------------


def med(runs: list[dict[str, float]], key: str) -> float:
    return median([r[key] for r in runs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-default", action="store_true", help="skip the default-model checkpoint split")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp, S3Server() as s3:
        work = Path(tmp)
        env = job_env(**s3.env)
        job_logging_to(work / "job-log.jsonl")  # the in-process parts log like the job; not on stdout
        base = work / "base"
        note(f"training the {PRESET} preset into {base}, SIGTERM after {STOP_AFTER_STEPS} steps")
        preempted_run(base, env)
        bucket = s3.create_bucket(f"bench-resume-{uuid.uuid4().hex[:6]}")
        cfg = build_config(PRESET, None, [f"train.epochs={RESUME_EPOCHS}"])
        total_steps = steps_per_epoch(cfg) * RESUME_EPOCHS

        e2e: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
        split: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
        imports: dict[str, list[float]] = {"local": [], "s3": []}
        startup: list[float] = []
        for k in range(args.repeats):
            for where in ("local", "s3") if k % 2 == 0 else ("s3", "local"):
                note(f"repeat {k + 1}/{args.repeats}: {where}")
                tag = f"{where}-{k}"
                if where == "local":
                    uri = str(work / f"run-{tag}")
                    shutil.copytree(base, uri)
                    extra: list[str] = []
                else:
                    prefix = f"run-{tag}"
                    s3.upload_folder(base, bucket, prefix)
                    uri = f"s3://{bucket}/{prefix}"
                    extra = ["--cache-dir", str(work / f"cache-{tag}")]
                command = [
                    sys.executable, "-m", "job", "train", "--preset", PRESET, "--run-uri", uri, *extra,
                    "--set", f"train.epochs={RESUME_EPOCHS}", "--set", "train.log_every_batches=1",
                ]
                e2e[where].append(run_until_first_step(command, env))
                # the split reads the same (untouched) checkpoints from a fresh copy
                src = str(work / f"split-{tag}")
                if where == "local":
                    shutil.copytree(base, src)
                else:
                    s3.upload_folder(base, bucket, f"split-{tag}")
                    src = f"s3://{bucket}/split-{tag}"
                split[where].append(checkpoint_split(src, work / f"split-cache-{tag}", cfg, total_steps))
            for where, seconds in import_seconds(env).items():
                imports[where].append(seconds)
            startup.append(startup_seconds(env))

        result: dict = {
            "bench": "resume",
            "preset": PRESET,
            "what": "seconds from process start (before Popen) to the first resumed step, and its parts",
            "checkpoint_mb": round(split["local"][0]["bytes"] / 2**20, 2),
            "repeats": args.repeats,
            "interpreter_start_seconds": round(median(startup), 3),
        }
        for where in ("local", "s3"):
            resumed = median([r["train.resumed"] for r in e2e[where]])
            first_step = median([r["train.progress"] for r in e2e[where]])
            parts = {
                "imports": median(startup) + median(imports[where]),
                "preflight": med(split[where], "preflight"),
                "checkpoint_list": med(split[where], "list"),
                "checkpoint_download": med(split[where], "download"),
                "checkpoint_verify": med(split[where], "verify"),
                "checkpoint_load": med(split[where], "load"),
                "dataset": med(split[where], "dataset"),
                "build_model": med(split[where], "build_model"),
            }
            parts["other"] = resumed - sum(parts.values())
            parts["first_step"] = first_step - resumed
            result[where] = {
                "to_first_step_seconds": round(first_step, 3),
                "to_resumed_seconds": round(resumed, 3),
                "first_step_repeats": spread([r["train.progress"] for r in e2e[where]], 3),
                "first_log_line_seconds": round(median([r["first_log_line"] for r in e2e[where]]), 3),
                "split_seconds": {k: round(v, 4) for k, v in parts.items()},
                "load_newest_valid_seconds": round(med(split[where], "load_newest_valid"), 4),
            }
        result["ratio"] = round(result["s3"]["to_first_step_seconds"] / result["local"]["to_first_step_seconds"], 3)
        result["ratio_to_resumed"] = round(result["s3"]["to_resumed_seconds"] / result["local"]["to_resumed_seconds"], 3)
        result["ratio_by_part"] = {
            k: round(result["s3"]["split_seconds"][k] / v, 2) if v > 0 else None
            for k, v in result["local"]["split_seconds"].items()
            if k != "other"
        }
        emit(result, torch_threads=torch.get_num_threads())

        if not args.no_default:
            bench_default_checkpoint(work, s3, bucket, args.repeats)


def bench_default_checkpoint(work: Path, s3: S3Server, bucket: str, repeats: int) -> None:
    note("default model: writing a checkpoint")
    folder = work / "default-run"
    default_checkpoint(folder)
    s3.upload_folder(folder, bucket, "default-run")
    cfg = build_config("default")
    runs: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
    for k in range(repeats):
        for where in ("local", "s3") if k % 2 == 0 else ("s3", "local"):
            note(f"default model: repeat {k + 1}/{repeats}: {where}")
            uri = str(folder) if where == "local" else f"s3://{bucket}/default-run"
            runs[where].append(checkpoint_split(uri, work / f"default-cache-{where}-{k}", cfg, 1000, dataset=False))
    keys = ("preflight", "list", "download", "verify", "load", "build_model", "load_newest_valid")
    result: dict = {
        "bench": "resume_checkpoint",
        "preset": "default",
        "what": "seconds to list, download, verify (sha256) and load (decode + restore) the newest checkpoint "
        "of the default model, empty cache, in-process (preflight opens the connection first)",
        "checkpoint_mb": round(runs["local"][0]["bytes"] / 2**20, 1),
        "repeats": repeats,
    }
    for where in ("local", "s3"):
        result[where] = {k: round(med(runs[where], k), 4) for k in keys}
    total = {w: sum(result[w][k] for k in ("list", "download", "verify", "load")) for w in ("local", "s3")}
    result["ratio"] = round(total["s3"] / total["local"], 2)
    result["ratio_by_part"] = {k: round(result["s3"][k] / result["local"][k], 2) for k in keys if result["local"][k] > 0}
    emit(result, torch_threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
