"""Shared helpers: run the job as a user would, as a separate process."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **extra)
    return env


def worker_processes(module: str) -> set[int]:
    """PIDs of the helper processes (job.worker) running ``python -m <module>`` on this machine."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and module.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def assert_workers_end(module: str, before: set[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while worker_processes(module) - before:
        assert time.monotonic() < deadline, f"{module} process(es) {worker_processes(module) - before} outlived the job"
        time.sleep(0.1)


def job_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "job", *args]


def run_job(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m job ARGS`` to completion and return its exit code and output."""
    return subprocess.run(
        job_command(*args), cwd=ROOT, env=env or job_env(), capture_output=True, text=True, timeout=timeout
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def final_model(run: Path) -> Path:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    return run / "checkpoints" / latest["checkpoint"] / "model.safetensors"


def log_events(output: str) -> list[dict]:
    """The JSON log records in a process's stdout."""
    events = []
    for line in output.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


@pytest.fixture(scope="session")
def smoke_baseline(tmp_path_factory) -> Path:
    """One uninterrupted smoke run, shared by the tests that compare against it."""
    run = tmp_path_factory.mktemp("baseline") / "run"
    result = run_job("train", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return run


# --- a real S3 endpoint on 127.0.0.1 --------------------------------------------------------

FAKE_SECRET = "TESTSECRETdoNotLeak0123456789abcdefXYZ"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Endpoint:
    """moto's S3 server on a free local port, which a test can take away and bring back
    (moto keeps the buckets in this process, so they survive a restart)."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def s3_endpoint():
    endpoint = S3Endpoint()
    yield endpoint
    endpoint.stop()


class S3Bucket:
    """A fresh bucket for one test, with the environment a job process needs to reach it."""

    def __init__(self, endpoint: S3Endpoint, name: str):
        import boto3

        self.endpoint, self.name = endpoint, name
        self.env = {
            "AWS_ENDPOINT_URL": endpoint.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.client = boto3.client(
            "s3", endpoint_url=endpoint.url, aws_access_key_id="testing",
            aws_secret_access_key=FAKE_SECRET, region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=name)

    def uri(self, prefix: str = "run") -> str:
        return f"s3://{self.name}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)


@pytest.fixture
def s3(s3_endpoint, monkeypatch) -> S3Bucket:
    bucket = S3Bucket(s3_endpoint, f"test-{uuid.uuid4().hex[:12]}")
    for key, value in bucket.env.items():
        monkeypatch.setenv(key, value)
    return bucket
