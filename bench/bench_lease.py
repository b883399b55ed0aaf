"""What one writer per run costs: the lease's renewal per heartbeat, and the delay it adds to a
restart after kill -9, against a moto S3 server on 127.0.0.1 (its own process).

    python bench/bench_lease.py [--repeats N]

1. Per heartbeat, in this process, alternating, medians of --repeats x 20: ``Lease.renew()`` (one
   conditional PUT of lease.json) against the writes a heartbeat already sends to the run URI
   (progress.json and PROGRESS.txt through ``RemoteFolder.write_bytes``); the same for a local
   run folder (a flock'd compare-and-replace against two atomic writes). Requests per heartbeat
   interval follow from the cadence: the lease renews every quarter of ``storage.lease_seconds``.
2. Restart delay, `smoke` on an s3:// run with an empty cache per start (a new container), medians
   of --repeats: from Popen of the restart to its `train.resumed`, after
   - a clean stop (SIGTERM: the job saves, flushes and releases its lease): the baseline;
   - kill -9 on this machine (the lease names a pid that is gone: taken at once);
   - kill -9 on another machine: the lease names a host whose processes cannot be checked from
     here (its boot id rewritten in the bucket right after the kill), so the restart waits for
     it to stay unchanged for a whole lease time (6 s on `smoke`, 60 s on `default`).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import ROOT, S3Server, emit, job_env, median, note, spread
from structlog.testing import capture_logs

from job.config import build_config
from job.monitoring.progress import render_progress
from job.runtime.files import json_bytes
from job.storage import Layout, LocalFolder, RemoteFolder
from job.storage.lease import RENEW_SHARE, Lease

LOOPS = 20
SMOKE = build_config("smoke")
TRAIN = ("train", "--preset", "smoke", "--set", "stage2.epochs=0", "--set", "train.epochs=30")


def heartbeat_writes(folder) -> None:
    """What a heartbeat sends to the run URI: progress.json and PROGRESS.txt."""
    fields = {"status": "running", "step": 100, "total_steps": 1000, "attempt": 1, "heartbeat_at": "now"}
    folder.write_bytes(Layout.progress, json_bytes(fields))
    folder.write_bytes(Layout.progress_text, render_progress(fields).encode())


def timed(call) -> float:
    started = time.perf_counter()
    for _ in range(LOOPS):
        call()
    return (time.perf_counter() - started) / LOOPS


def per_heartbeat(kind: str, folder, repeats: int) -> None:
    lease = Lease(folder, SMOKE.storage.lease_seconds)
    beats, renewals = [], []
    with capture_logs():  # the lease's log lines; stdout holds only the JSON results
        lease.acquire(wait_seconds=0)
        for _ in range(repeats):
            beats.append(timed(lambda: heartbeat_writes(folder)))
            renewals.append(timed(lease.renew))
        lease.release()
    default = build_config("default")
    per_interval = default.monitor.heartbeat_seconds / (default.storage.lease_seconds * RENEW_SHARE)
    emit({
        "bench": "lease", "what": "renewal against a heartbeat's writes", "run_folder": kind,
        "renew_ms": round(1000 * median(renewals), 3), "heartbeat_writes_ms": round(1000 * median(beats), 3),
        "ratio": round(median(renewals) / median(beats), 3),
        "renew_ms_repeats": spread([1000 * r for r in renewals], 3),
        "heartbeat_ms_repeats": spread([1000 * b for b in beats], 3),
        # A heartbeat sends progress.json, PROGRESS.txt and the log (timed above without the log,
        # whose size grows); the lease renews every quarter of its time: 2 per default heartbeat.
        "requests_per_renewal": 1, "heartbeat_requests": 3,
        "renewals_per_heartbeat_default": per_interval,
    })


def start(uri: str, cache: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "job", *TRAIN, "--run-uri", uri, "--cache-dir", str(cache)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_event(proc: subprocess.Popen, event: str, timeout: float = 180) -> float:
    """Seconds until ``proc`` logs ``event`` (its output is read line by line)."""
    started = time.perf_counter()
    for line in proc.stdout:
        if f'"{event}"' in line:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout:
            break
    proc.kill()
    raise RuntimeError(f"no {event} from the job within {timeout} s")


def restart_delay(how: str, server: S3Server, bucket: str, tmp: Path, env: dict[str, str]) -> float:
    """Seconds from the restart's Popen to its `train.resumed`, after the first start ended ``how``."""
    uri = f"s3://{bucket}/{how}-{uuid.uuid4().hex[:8]}"
    first = start(uri, tmp / uuid.uuid4().hex, env)
    folder = RemoteFolder(uri)
    wait_event(first, "checkpoint.saved")
    while not folder.exists(Layout.tokenizer.latest):  # the restart must find a checkpoint
        time.sleep(0.1)
    if how == "clean":
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    else:
        first.kill()
        first.communicate(timeout=60)
        if how == "kill -9, another machine":
            doc = json.loads(folder.read_bytes(Layout.lease))
            folder.write_bytes(Layout.lease, json_bytes({**doc, "boot_id": "another machine"}))
    restart = start(uri, tmp / uuid.uuid4().hex, env)
    try:
        return wait_event(restart, "train.resumed")
    finally:
        restart.kill()
        restart.communicate(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with S3Server() as server, tempfile.TemporaryDirectory() as tmp:
        bucket = server.create_bucket(f"bench-{uuid.uuid4().hex[:8]}")
        note("per heartbeat")
        per_heartbeat("s3", RemoteFolder(f"s3://{bucket}/beats"), args.repeats)
        per_heartbeat("local", LocalFolder(Path(tmp) / "beats"), args.repeats)
        env = job_env(**server.env)
        delays: dict[str, list[float]] = {}
        for how in ("clean", "kill -9, this machine", "kill -9, another machine"):
            note(f"restart after {how}")
            delays[how] = [restart_delay(how, server, bucket, Path(tmp), env) for _ in range(args.repeats)]
        clean = median(delays["clean"])
        for how, seconds in delays.items():
            emit({
                "bench": "lease", "what": "restart to train.resumed", "after": how, "preset": "smoke",
                "lease_seconds": SMOKE.storage.lease_seconds, "seconds": round(median(seconds), 2),
                "added_seconds": round(median(seconds) - clean, 2), "ratio": round(median(seconds) / clean, 2),
                "repeats": spread(seconds, 2),
            })


if __name__ == "__main__":
    main()
