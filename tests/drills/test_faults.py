"""Fault drills with real signals and real hangs; secrets and planted pickles; the console form."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from job.checkpoints.format import DATA_FILES, FORMAT_VERSION
from tests.helpers import (
    FAKE_SECRET,
    HANG_AT_STEP,
    JobProcess,
    assert_workers_end,
    final_model,
    job_env,
    log_events,
    run_job,
    sha256,
    worker_processes,
)

pytestmark = pytest.mark.timeout(240)


def start(run: Path, *extra: str) -> JobProcess:
    return JobProcess.job("train", "--preset", "smoke", "--run-uri", str(run), *extra)


PLOT_WORKER = "job.plots.worker"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_and_exits_143_within_10_s_then_resumes_exactly(tmp_path, smoke_baseline, sig):
    run = tmp_path / "run"
    workers_before = worker_processes(PLOT_WORKER)
    proc = start(run)
    proc.wait_for('"train.progress"', timeout=60)
    sent = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(timeout=15) == 143
    assert time.monotonic() - sent < 10
    assert_workers_end(PLOT_WORKER, workers_before)
    saved = proc.events("checkpoint.saved")
    assert saved[-1]["reason"] == "signal"
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "preempted" and progress["last_checkpoint"] == saved[-1]["checkpoint"]

    result = run_job("train", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 0, result.stderr
    resumed = [e for e in log_events(result.stdout) if e["event"] == "train.resumed"]
    assert resumed[0]["checkpoint"] == saved[-1]["checkpoint"]
    assert sha256(final_model(run)) == sha256(final_model(smoke_baseline))


@pytest.mark.serial  # the plots are drawn at idle priority: a busy machine may never draw them
def test_a_sigkilled_job_leaves_no_plot_worker_behind(tmp_path):
    run = tmp_path / "run"
    workers_before = worker_processes(PLOT_WORKER)
    # Still training when killed, after both plots were drawn (a plot is due a second into the run).
    proc = start(run, "--set", "train.epochs=40", "--set", "monitor.plot_every_seconds=1")
    deadline = time.monotonic() + 60
    while not all((run / "plots" / name).exists() for name in ("reconstruction.png", "loss.png")):
        assert time.monotonic() < deadline and proc.poll() is None, "no plots drawn"
        time.sleep(0.05)
    assert worker_processes(PLOT_WORKER) - workers_before, "no plot worker process while the job runs"
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=15)
    assert_workers_end(PLOT_WORKER, workers_before)


def test_the_watchdog_ends_a_hung_step_with_exit_75_and_every_stack(tmp_path):
    run = tmp_path / "run"
    limit_seconds = 3
    proc = JobProcess([
        sys.executable, str(HANG_AT_STEP), "7", "train", "--preset", "smoke", "--run-uri", str(run),
        "--set", f"monitor.watchdog_minutes={limit_seconds / 60}",
    ])
    proc.wait_for('"train.progress"', timeout=60)
    started = time.monotonic()
    assert proc.wait(timeout=60) == 75
    assert time.monotonic() - started < limit_seconds + 10
    stalled = proc.events("watchdog.stalled")
    assert stalled and stalled[0]["level"] == "error"
    stacks = stalled[0]["stacks"]
    assert any(name.startswith("MainThread") and "train_step" in stack for name, stack in stacks.items())
    assert any(name.startswith("heartbeat") for name in stacks)
    in_log_file = (run / "logs" / "attempt-001.jsonl").read_text()
    assert "watchdog.stalled" in in_log_file and "train_step" in in_log_file
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "stalled" and progress["step"] >= 2


def test_no_secret_reaches_output_logs_or_the_run_folder(s3, tmp_path):
    cache = tmp_path / "cache"
    result = run_job(
        "train", "--preset", "smoke", "--run-uri", s3.uri(), "--cache-dir", str(cache), "--log-level", "DEBUG",
        "--set", "train.epochs=1",
    )
    assert result.returncode == 0, result.stderr
    assert '"level": "debug"' in result.stdout  # DEBUG really was on
    assert FAKE_SECRET not in result.stdout and FAKE_SECRET not in result.stderr
    for path in cache.rglob("*"):
        if path.is_file():
            assert FAKE_SECRET.encode() not in path.read_bytes(), path
    for key in s3.keys("run/"):
        assert FAKE_SECRET.encode() not in s3.get(key), key


def test_an_error_message_that_quotes_a_secret_is_redacted(tmp_path):
    env = job_env(AWS_SECRET_ACCESS_KEY=FAKE_SECRET)
    result = run_job("train", "--preset", "smoke", "--run-uri", str(tmp_path / "r"), "--config",
                     str(tmp_path / f"{FAKE_SECRET}.json"), env=env)
    assert result.returncode == 2
    assert FAKE_SECRET not in result.stdout + result.stderr and "[REDACTED]" in result.stderr


class PlantedPickle:
    """Unpickling this creates the marker file: proof that code from the run folder ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_checkpoint_is_never_executed(tmp_path, smoke_baseline):
    import torch

    run = tmp_path / "run"
    shutil.copytree(smoke_baseline, run)
    marker = tmp_path / "PWNED"
    PlantedPickle.marker = str(marker)
    planted = run / "checkpoints" / "step-99999999"
    planted.mkdir()
    files = {}
    for filename in DATA_FILES:
        torch.save({"payload": PlantedPickle()}, planted / filename)
        data = (planted / filename).read_bytes()
        files[filename] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (planted / "manifest.json").write_text(json.dumps({"format": FORMAT_VERSION, "step": 99999999, "epoch": 99, "files": files}))
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step-99999999", "step": 99999999}))
    assert not marker.exists()

    result = run_job("train", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 0, result.stderr
    skipped = [e for e in log_events(result.stdout) if e["event"] == "checkpoint.skipped"]
    assert skipped and skipped[0]["checkpoint"] == "step-99999999"
    assert not marker.exists()

    verify = run_job("verify", "--preset", "smoke", "--run-uri", str(run))
    assert verify.returncode == 1  # the planted folder fails its checks; nothing of it runs
    report = json.loads((run / "verify" / "report.json").read_text())
    assert any(not c["passed"] and "step-99999999" in c["name"] for c in report["checks"])
    assert not marker.exists()

    evaluate = run_job("evaluate", "--preset", "smoke", "--run-uri", str(run))
    assert evaluate.returncode == 0, evaluate.stderr  # it evaluates a sound checkpoint instead
    assert json.loads((run / "eval" / "report.json").read_text())["checkpoint"] != "step-99999999"
    assert not marker.exists()
