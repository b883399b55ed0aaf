"""Start-up on a slow store: from Popen of `train` to its first training step, on a run URI whose
every request takes 1.5 s more each way (a 3 s round trip), against the same start on local disk,
in the same run.

    python bench/bench_slow_store.py [--repeats N] [--delay SECONDS]

A moto S3 server in its own process, behind the test suite's proxy (tests.helpers.FaultyStore)
that adds ``--delay`` to each direction of every request it forwards. Each repeat, alternating
local and s3: a fresh `smoke` run (stage 1 only) with an empty cache, timed from Popen to its
`train.fresh_start` (start-up done) and to its first `train.progress` line (the first steps
done), then killed. For s3 the proxy counts the requests made until then. The ratio is s3 over
local, of the medians.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import ROOT, S3Server, emit, job_env, median, note, spread

sys.path.insert(0, str(ROOT))  # the test suite's proxy: the same slow store the drill meets
from tests.helpers import FaultyStore  # noqa: E402

TRAIN = ("train", "--preset", "smoke", "--set", "stage2.epochs=0", "--set", "storage.lease_seconds=60")


def start_to_first_step(uri: str, cache: Path, env: dict[str, str], proxy: FaultyStore) -> dict[str, float]:
    """Seconds from Popen to start-up done and to the first step, and the requests until then."""
    before = proxy.requests
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", *TRAIN, "--run-uri", uri, "--cache-dir", str(cache)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    times: dict[str, float] = {}
    try:
        for line in proc.stdout:
            event = json.loads(line).get("event") if line.startswith("{") else None
            if event == "train.fresh_start":
                times["startup_seconds"] = time.monotonic() - started
            elif event == "train.progress":
                times["first_step_seconds"] = time.monotonic() - started
                times["requests"] = proxy.requests - before
                break
    finally:
        proc.kill()
        proc.wait()
    if "first_step_seconds" not in times:
        raise RuntimeError(f"train on {uri} ended before its first step")
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--delay", type=float, default=1.5)
    args = parser.parse_args()
    with S3Server() as server, tempfile.TemporaryDirectory() as tmp:
        bucket = server.create_bucket(f"bench-{uuid.uuid4().hex[:8]}")
        proxy = FaultyStore(server.url)
        proxy.delay = args.delay
        env = job_env(**{**server.env, "AWS_ENDPOINT_URL": proxy.url})
        runs: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
        try:
            for repeat in range(args.repeats):
                for where in runs:
                    note(f"{where}, repeat {repeat + 1}")
                    uri = str(Path(tmp) / f"run-{repeat}") if where == "local" else f"s3://{bucket}/run-{repeat}"
                    runs[where].append(start_to_first_step(uri, Path(tmp) / f"cache-{where}-{repeat}", env, proxy))
        finally:
            proxy.close()
    first_step = {where: median([r["first_step_seconds"] for r in found]) for where, found in runs.items()}
    emit({
        "bench": "slow_store", "what": "Popen of train to its first train.progress (smoke, stage 1, empty cache)",
        "delay_each_way_seconds": args.delay, "round_trip_seconds": 2 * args.delay,
        "local_seconds": round(first_step["local"], 2), "s3_seconds": round(first_step["s3"], 2),
        "ratio": round(first_step["s3"] / first_step["local"], 2),
        "s3_startup_seconds": round(median([r["startup_seconds"] for r in runs["s3"]]), 2),
        "local_startup_seconds": round(median([r["startup_seconds"] for r in runs["local"]]), 2),
        "s3_requests_before_first_step": spread([r["requests"] for r in runs["s3"]], 0),
        "repeats": {where: spread([r["first_step_seconds"] for r in found], 2) for where, found in runs.items()},
    })


if __name__ == "__main__":
    main()
