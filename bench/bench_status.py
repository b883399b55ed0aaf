"""How long `python -m job status` takes, as a person runs it, against a bucket and on disk.

    python bench/bench_status.py [--repeats N]

A run folder shaped like a real one (progress, config, metrics of 10 epochs, three committed
checkpoints with their manifests, latest.json, a verify report) goes into a bucket of a moto S3
server running in its own process, and into a local folder. Each command runs N times as a
fresh process, which is what a person waits for; the medians are compared with baselines that
run in the same way, in the same run of this script:

- `bare_listing`: a Python process that imports s3fs and lists the run folder once, the least
  any Python tool reading the bucket through s3fs can cost;
- `python_start`: an interpreter that does nothing.

Prints one JSON line per run folder kind, with `ratio` = status / bare_listing (s3) or status /
python_start (local), and the in-process split of status between imports and reading the store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from common import ROOT, S3Server, emit, job_env, median, note, spread

BUCKET = "bench-status"
PREFIX = "runs/exp1"


def iso(seconds_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).isoformat(timespec="seconds")


def run_folder() -> dict[str, bytes]:
    """The files status reads, with sizes like a `small` run's (weights are random bytes: status
    compares sizes, never contents)."""
    epochs, steps_per_epoch = 10, 60
    files: dict[str, bytes] = {}
    for epoch in (8, 9, 10):
        name = f"step-{epoch * steps_per_epoch:08d}"
        blobs = {"model.safetensors": os.urandom(200_000), "optimizer.safetensors": os.urandom(400_000),
                 "rng.safetensors": os.urandom(5_000), "state.json": json.dumps({"step": epoch * steps_per_epoch}).encode()}
        manifest = {"format": 1, "step": epoch * steps_per_epoch, "epoch": epoch, "created_at": iso(60),
                    "files": {f: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for f, d in blobs.items()}}
        files |= {f"checkpoints/{name}/{f}": d for f, d in blobs.items()}
        files[f"checkpoints/{name}/manifest.json"] = json.dumps(manifest).encode()
    files["checkpoints/latest.json"] = json.dumps({"checkpoint": name, "step": epochs * steps_per_epoch}).encode()
    files["progress.json"] = json.dumps({
        "status": "running", "mode": "train", "stage": 1, "stages": 2, "stage_name": "tokenizer", "epoch": epochs,
        "epochs": 12, "step": epochs * steps_per_epoch, "total_steps": 12 * steps_per_epoch, "loss": 0.0123,
        "samples_per_second": 30.5, "eta_seconds": 300, "started_at": iso(3600), "updated_at": iso(5),
        "heartbeat_at": iso(5), "attempt": 2, "last_checkpoint": name,
    }).encode()
    files["config.json"] = json.dumps({"monitor": {"heartbeat_seconds": 10.0}}).encode()
    files["metrics.jsonl"] = "".join(
        json.dumps({"epoch": e, "step": e * steps_per_epoch, "train_loss": 1 / e, "val_loss": 1.1 / e}) + "\n"
        for e in range(1, epochs + 1)
    ).encode()
    files["verify/report.json"] = json.dumps({"passed": True, "checks": [{"name": f"manifest {name}", "passed": True}]}).encode()
    return files


def timed(command: list[str], env: dict[str, str], expect: int = 0) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    if result.returncode != expect:
        raise RuntimeError(f"{command[:4]} exited {result.returncode}: {result.stderr[-2000:]}")
    return seconds


def repeat(label: str, command: list[str], env: dict[str, str], repeats: int) -> list[float]:
    timed(command, env)  # once to warm the page cache and the server
    times = [timed(command, env) for _ in range(repeats)]
    note(f"{label}: median {median(times):.3f} s")
    return times


def split_in_process(uri: str, env: dict[str, str]) -> dict[str, float]:
    """Where the time of one status goes: the imports, then the requests and judging."""
    script = (
        "import time, json\n"
        "t0 = time.perf_counter()\n"
        "from job.modes.status import read_run\n"
        "t1 = time.perf_counter()\n"
        f"report = read_run({uri!r})\n"
        "t2 = time.perf_counter()\n"
        "print(json.dumps({'imports': t1 - t0, 'reading': t2 - t1, 'health': report.health}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    split = json.loads(result.stdout)
    return {"imports": round(split["imports"], 3), "reading_and_judging": round(split["reading"], 3), "health": split["health"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    files = run_folder()
    status = [sys.executable, "-m", "job", "status"]
    python_start = repeat("python_start", [sys.executable, "-c", "pass"], job_env(), args.repeats)

    with tempfile.TemporaryDirectory() as folder:
        for rel, data in files.items():
            (Path(folder) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(folder) / rel).write_bytes(data)
        local = repeat("status local", [*status, folder], job_env(), args.repeats)
        emit({
            "bench": "status", "run_folder": "local", "files": len(files),
            "status_seconds": round(median(local), 3), "status_runs": spread(local, 3),
            "baseline": "python_start", "baseline_seconds": round(median(python_start), 3),
            "ratio": round(median(local) / median(python_start), 2),
            "in_process": split_in_process(folder, job_env()),
        })

    with S3Server() as server:
        server.create_bucket(BUCKET)
        client = server.client()
        for rel, data in files.items():
            client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}", Body=data)
        uri = f"s3://{BUCKET}/{PREFIX}"
        env = job_env(**server.env)
        listing = (
            "import s3fs\n"
            f"s3fs.S3FileSystem(skip_instance_cache=True).ls({f'{BUCKET}/{PREFIX}'!r})\n"
        )
        bare = repeat("bare_listing", [sys.executable, "-c", listing], env, args.repeats)
        remote = repeat("status s3", [*status, uri], env, args.repeats)
        emit({
            "bench": "status", "run_folder": "s3 (moto server on 127.0.0.1, its own process)", "files": len(files),
            "status_seconds": round(median(remote), 3), "status_runs": spread(remote, 3),
            "baseline": "bare_listing", "baseline_seconds": round(median(bare), 3), "baseline_runs": spread(bare, 3),
            "python_start_seconds": round(median(python_start), 3),
            "ratio": round(median(remote) / median(bare), 2),
            "in_process": split_in_process(uri, env),
        })


if __name__ == "__main__":
    main()
