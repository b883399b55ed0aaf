"""A disk that fills up mid-run (SPEC §3, §10), on a real small tmpfs: the job says which path and
how much space, logs it once (no `--- Logging error ---` per record), tells the bucket the run
`failed` and why (that write needs no local space), exits 1, and resumes once space is freed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from job.config import steps_per_epoch
from tests.helpers import SMOKE, TOKENIZER_ONLY, JobProcess, log_events, run_job

pytestmark = pytest.mark.timeout(180)


# The preflight asks for the dataset, the kept checkpoints and 64 MiB to spare.
DISK_MIB = 80
# One epoch of the tokenizer, with a checkpoint every few steps, so that a write comes soon after
# the disk fills up (and the resumed run has little left to do).
WRITES_SOON = ("--set", "checkpoint.every_steps=3", "--set", "train.epochs=1", *TOKENIZER_ONLY)


@pytest.fixture
def small_disk(tmp_path) -> Path:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs permission to mount a tmpfs (root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file; return it (deleting it frees the space)."""
    filler = disk / "filler"
    chunk = 1 << 20
    with open(filler, "wb", buffering=0) as f:
        while chunk:
            try:
                f.write(b"\0" * chunk)
            except OSError:
                chunk //= 2
    return filler


def fill_once_a_checkpoint_is_saved(proc: JobProcess, disk: Path) -> Path:
    assert proc.wait_for('"checkpoint.saved"', timeout=90), proc.output[-3000:]
    return fill(disk)


def assert_one_clear_failure(proc: JobProcess, disk: Path) -> str:
    """Exit 1; one line on stderr naming a path on the full disk and the space; no flood."""
    assert proc.wait(timeout=60) == 1, proc.output[-3000:]
    output = proc.output
    assert "Logging error" not in output and "Traceback" not in output
    assert len(proc.events("log_file.failed")) <= 1
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    assert f"no space left on device writing {disk}/" in errors[0] and "free there" in errors[0]
    return errors[0]


def test_a_full_cache_disk_fails_the_run_in_the_bucket_with_the_reason_and_it_resumes_once_freed(s3, small_disk):
    cache = small_disk / "cache"
    args = ("train", "--preset", "smoke", "--run-uri", s3.uri(), "--cache-dir", str(cache), *WRITES_SOON)
    proc = JobProcess.job(*args)
    filler = fill_once_a_checkpoint_is_saved(proc, small_disk)
    error = assert_one_clear_failure(proc, small_disk)

    progress = json.loads(s3.get("run/progress.json"))
    assert progress["status"] == "failed"
    assert "no space left on device writing" in progress["error"] and "free there" in progress["error"]
    assert error.removeprefix("error: ") in progress["error"]

    filler.unlink()
    result = run_job(*args, timeout=150)
    assert result.returncode == 0, result.stderr
    resumed = [e for e in log_events(result.stdout) if e["event"] == "train.resumed"]
    assert resumed and resumed[0]["step"] > 0
    progress = json.loads(s3.get("run/progress.json"))
    assert progress["status"] == "completed" and progress["step"] == steps_per_epoch(SMOKE)


def test_a_full_disk_under_a_local_run_folder_ends_with_one_clear_message(small_disk):
    run = small_disk / "run"
    proc = JobProcess.job("train", "--preset", "smoke", "--run-uri", str(run), *WRITES_SOON)
    fill_once_a_checkpoint_is_saved(proc, small_disk)
    assert_one_clear_failure(proc, small_disk)
