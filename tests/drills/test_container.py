"""entrypoint.sh run exactly as the image runs it (tini -> entrypoint.sh -> exec python) with the
real job: help, SIGTERM to the entrypoint's pid, and the image's HEALTHCHECK on real and crafted
runs."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from job.exits import EXIT_PREEMPTED
from tests.helpers import ROOT, entrypoint_env, log_events, run_entrypoint

pytestmark = pytest.mark.timeout(600)

ENTRYPOINT = ROOT / "entrypoint.sh"


def collect(proc: subprocess.Popen) -> list[str]:
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def training_started(lines: list[str]) -> bool:
    return any('"train.progress"' in line or '"train.resumed"' in line for line in lines)


def test_entrypoint_help_without_a_mode_is_trains_help():
    result = run_entrypoint("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m job train")
    assert "--run-uri" in result.stdout and "--cache-dir" in result.stdout


def test_sigterm_to_the_entrypoints_pid_reaches_python_which_saves_and_exits_143(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [str(ENTRYPOINT), "train", "--set", "train.epochs=200"], cwd=tmp_path,
        env=entrypoint_env(JOB_PRESET="smoke", JOB_RUN_URI=str(run)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = collect(proc)
    try:
        wait_for(lambda: training_started(lines) or proc.poll() is not None, 120, "training to start")
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert Path(cmdline[0].decode()).name.startswith("python") and cmdline[1:4] == [b"-m", b"job", b"train"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == EXIT_PREEMPTED, "".join(lines[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()
    events = log_events("".join(lines))
    assert any(e["event"] == "signal.received" and e["signal"] == "SIGTERM" for e in events)
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "preempted" and progress["last_checkpoint"]


# --- the HEALTHCHECK ---------------------------------------------------------------------


def write_progress(folder: Path, status: str, heartbeat_age: timedelta) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    beat = (datetime.now(timezone.utc) - heartbeat_age).isoformat(timespec="seconds")
    (folder / "progress.json").write_text(json.dumps(
        {"status": status, "mode": "train", "epoch": 1, "epochs": 4, "step": 10, "total_steps": 104,
         "started_at": beat, "updated_at": beat, "heartbeat_at": beat, "attempt": 1}
    ))


def test_the_healthcheck_passes_a_completed_run(smoke_baseline):
    result = run_entrypoint("healthcheck", env=entrypoint_env(JOB_RUN_URI=str(smoke_baseline)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "completed" in result.stdout


def test_the_healthcheck_reads_the_local_cache_of_an_s3_run_not_the_bucket(tmp_path):
    cache = tmp_path / "cache"
    write_progress(cache, "running", timedelta(seconds=5))
    # The endpoint answers nothing: the check must not need it.
    env = entrypoint_env(JOB_RUN_URI="s3://my-bucket/runs/exp1", JOB_CACHE_DIR=str(cache),
                         AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    started = time.monotonic()
    result = run_entrypoint("healthcheck", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("status, age", [
    ("running", timedelta(hours=1)),  # heartbeat older than 3 intervals: dead or hung
    ("starting", timedelta(minutes=5)),
    ("stalled", timedelta(seconds=1)),
    ("failed", timedelta(seconds=1)),
])
def test_the_healthcheck_fails_a_stale_or_failed_run_with_exit_1(tmp_path, status, age):
    write_progress(tmp_path / "run", status, age)
    result = run_entrypoint("healthcheck", env=entrypoint_env(JOB_RUN_URI=str(tmp_path / "run")))
    assert result.returncode == 1, result.stdout + result.stderr


def test_the_healthcheck_reports_no_progress_yet_as_1_not_dockers_reserved_2(tmp_path):
    (tmp_path / "cache").mkdir()
    env = entrypoint_env(JOB_RUN_URI="s3://my-bucket/runs/exp1", JOB_CACHE_DIR=str(tmp_path / "cache"))
    assert run_entrypoint("healthcheck", env=env).returncode == 1
