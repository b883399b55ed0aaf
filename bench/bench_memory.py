"""Peak memory (RSS) of the job's processes, one JSON line per command.

    python bench/bench_memory.py [--default-batch N] [--steps N]

Each command runs as a child process, one at a time. Its peak is the kernel's own: ru_maxrss
from os.wait4 for exactly that child, and VmHWM sampled from /proc/PID/status every 10 ms
(which also gives the anonymous / file-backed split; the dataset's memory-mapped pages are
file-backed, page cache the kernel can drop). Linux carries the forked bench process's own RSS
into the child's ru_maxrss across exec, so ru_maxrss is exact only when it exceeds the bench's
RSS at the fork; otherwise (a small, short process like `status`) the peak reported is the last
sampled VmHWM, a lower bound, with ru_maxrss as the upper bound.

- train small: `python -m job train --preset small --set train.epochs=1` on a local run folder,
  to the end (generation, 60 steps, validation, checkpoints, plots); and again on an s3:// run
  folder. The job's helper process (the plot worker) has its own peak, sampled from /proc
  every 0.1 s and reported apart.
- train default data: `python -m job train --preset default --set train.batch_size=N` on a
  local run folder: generates the 10,000 x 16 x 64 x 64 dataset (655 MB of uint8 shards), opens
  it memory-mapped, builds the default model and trains --steps steps, then SIGTERM: the job
  finishes the step, saves a checkpoint and exits 143. The RSS when training starts (dataset
  generated and open, model built) is reported too. The batch size is reduced from the preset's
  32 (default N=2) because on CPU the default model's activations at batch 32 need about 12 GB
  and 75 s per step on 2 cores (the README has that one-off measurement; --default-batch 32
  repeats it). The target of 2 GB is about the dataset, which must not be held in memory.
- status: `python -m job status RUN` on the small run, local and in an s3:// bucket (a moto
  server on 127.0.0.1). Target: under 100 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from common import ROOT, S3Server, child_modules, emit, job_env, note

TRAIN_TARGET_MB = 2048
STATUS_TARGET_MB = 100


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a process, in kB ({} once it is gone)."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return fields


def measure(command: list[str], env: dict[str, str], stop_after_progress: int = 0, timeout: float = 600) -> dict:
    """Run ``command`` to its end (or SIGTERM it after that many train.progress lines) and
    return its peak RSS and what it logged on the way."""
    parent_rss_kb = proc_status(os.getpid()).get("VmRSS", 0)
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[dict[str, int]] = []
    helper_peaks_kb: dict[str, int] = {}
    at_event: dict[str, dict[str, int]] = {}
    done = threading.Event()
    progress_lines = 0
    output: list[str] = []

    def read_stdout() -> None:
        nonlocal progress_lines
        for line in proc.stdout:
            output.append(line)
            try:
                event = json.loads(line).get("event", "")
            except ValueError:
                continue
            if event in ("train.fresh_start", "train.resumed"):
                at_event["train_start"] = proc_status(proc.pid)
            if event == "train.progress":
                progress_lines += 1
                if stop_after_progress and progress_lines == stop_after_progress:
                    proc.send_signal(signal.SIGTERM)

    def sample() -> None:
        count = 0
        while not done.wait(0.01):
            fields = proc_status(proc.pid)
            if fields:
                samples.append(fields)
            count += 1
            if count % 10 == 0:
                # the job's helpers: its ``python -m job.<helper>`` children
                for helper, module in child_modules(proc.pid).items():
                    if module is None:
                        continue
                    peak = proc_status(helper).get("VmHWM", 0)
                    helper_peaks_kb[module] = max(helper_peaks_kb.get(module, 0), peak)

    threads = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=sample, daemon=True)]
    stderr: list[str] = []
    threads.append(threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True))
    for t in threads:
        t.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
        done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so that Popen does not wait again
    for t in threads:
        t.join(timeout=5)
    peak_sample = max(samples, key=lambda s: s.get("VmRSS", 0), default={})
    sampled_kb = max((s.get("VmHWM", 0) for s in samples), default=0)
    exact = usage.ru_maxrss > parent_rss_kb * 1.1  # kB on Linux
    return {
        "exit_code": proc.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round((usage.ru_maxrss if exact else sampled_kb) / 1024, 1),
        "peak_source": "ru_maxrss" if exact else "sampled VmHWM (lower bound; ru_maxrss_mb is the upper bound)",
        "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
        "sampled_vmhwm_mb": round(sampled_kb / 1024, 1),
        "bench_rss_at_fork_mb": round(parent_rss_kb / 1024, 1),
        "at_sampled_peak_mb": {k: round(v / 1024, 1) for k, v in peak_sample.items() if k != "VmHWM"},
        "at_train_start_mb": {k: round(v / 1024, 1) for k, v in at_event.get("train_start", {}).items()},
        "helper_peak_rss_mb": {k: round(v / 1024, 1) for k, v in sorted(helper_peaks_kb.items())},
        "progress_lines": progress_lines,
        "stderr_tail": "".join(stderr)[-500:] if proc.returncode not in (0, 143) else "",
    }


def python_job(*args: str) -> list[str]:
    return [sys.executable, "-m", "job", *args]


def report(what: str, command: list[str], result: dict, target_mb: float | None, **extra) -> None:
    record = {
        "bench": "memory",
        "what": what,
        "command": " ".join(["python", *command[1:]]),
        **result,
        **extra,
    }
    # The job with its helpers, as if every process peaked at once: never below the true peak.
    record["with_helpers_upper_bound_mb"] = round(result["ru_maxrss_mb"] + sum(result["helper_peak_rss_mb"].values()), 1)
    if target_mb is not None:
        record["target_mb"] = target_mb
        record["met"] = record["with_helpers_upper_bound_mb"] < target_mb and result["exit_code"] in (0, 143)
    emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-batch", type=int, default=2, help="train.batch_size for the default preset's run")
    parser.add_argument("--steps", type=int, default=2, help="training steps of the default run before SIGTERM")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, S3Server() as s3:
        work = Path(tmp)
        env = job_env(**s3.env)

        small_run = work / "small"
        command = python_job("train", "--preset", "small", "--run-uri", str(small_run), "--set", "train.epochs=1")
        note("train --preset small (1 epoch)")
        report("train small preset, 1 epoch, local run folder", command, measure(command, env), TRAIN_TARGET_MB)
        bucket = s3.create_bucket(f"bench-memory-{uuid.uuid4().hex[:6]}")
        command = python_job(
            "train", "--preset", "small", "--run-uri", f"s3://{bucket}/small-s3", "--cache-dir", str(work / "cache"),
            "--set", "train.epochs=1",
        )
        note("train --preset small (1 epoch), s3:// run folder")
        report("train small preset, 1 epoch, s3:// run folder", command, measure(command, env), TRAIN_TARGET_MB)

        default_run = work / "default"
        command = python_job(
            "train", "--preset", "default", "--run-uri", str(default_run),
            "--set", f"train.batch_size={args.default_batch}", "--set", "train.log_every_batches=1",
        )
        note(f"train --preset default, batch {args.default_batch}, SIGTERM after {args.steps} steps")
        result = measure(command, env, stop_after_progress=args.steps, timeout=1800)
        report(
            f"train default data (10,000 x 16 x 64 x 64 generated, memory-mapped) and default model, "
            f"batch {args.default_batch}, {args.steps} steps then SIGTERM",
            command, result, TRAIN_TARGET_MB, batch_size=args.default_batch,
        )

        s3.upload_folder(small_run, bucket, "small")
        for where, uri in (("local", str(small_run)), ("s3", f"s3://{bucket}/small")):
            command = python_job("status", uri)
            note(f"status ({where})")
            report(f"status of the small run, {where} run folder", command, measure(command, env), STATUS_TARGET_MB)


if __name__ == "__main__":
    main()
