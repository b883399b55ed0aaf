"""Shared helpers: run the job as a user would, as a separate process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOB_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **extra)
    return env


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
