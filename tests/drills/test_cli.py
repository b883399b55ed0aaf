"""The command line as a process: help for each mode, bad arguments and unknown modes exit 2
before any work, the environment selects preset and run URI, and a store that refuses for good
exits 2 at once naming the fix."""

from __future__ import annotations

import json
import time

import pytest

from job.config import build_config
from job.exits import EXIT_USAGE
from tests.helpers import FAKE_SECRET, REFUSALS, job_env, run_job

pytestmark = pytest.mark.timeout(120)


# --- a store that refuses us for good: exit 2 at once, naming what to fix ----------------------

@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "mode, code",
    [  # every mode preflights through the same RunStore (test_storage covers each refusal there)
        ("train", "NoSuchBucket"),  # the real answer of the S3 server for a bucket nobody made
        ("verify", "SignatureDoesNotMatch"),
        ("status", "NoSuchBucket"),
        ("status", "InvalidAccessKeyId"),
    ],
)
def test_a_store_that_refuses_for_good_exits_2_at_once_naming_the_fix(s3, faulty_store, tmp_path, mode, code):
    uri = f"s3://{s3.name}-missing/run" if code == "NoSuchBucket" else s3.uri()
    if code == "NoSuchBucket":
        env, fix = s3.env, f"bucket {s3.name}-missing does not exist"
    else:
        status, message, fix = REFUSALS[code]
        faulty_store.fail_always(status, code, message)
        env = faulty_store.env
    args = ["status", uri] if mode == "status" else [mode, "--preset", "smoke", "--run-uri", uri,
                                                      "--cache-dir", str(tmp_path / "cache")]
    started = time.monotonic()
    result = run_job(*args, env=job_env(**env), timeout=120)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_USAGE, output[-3000:]
    assert code in output and fix in output, output[-3000:]
    assert "storage.unreachable" not in output  # not retried: its answer will not change
    assert seconds < 60, f"{seconds:.0f} s: the reachability timeout (300 s) is for stores that do not answer"
    assert FAKE_SECRET not in output and "Traceback" not in output


@pytest.mark.parametrize("mode", ["generate", "train"])
def test_help_for_each_mode(mode):
    result = run_job(mode, "--help")
    assert result.returncode == 0
    for option in ("--run-uri", "--preset", "--config", "--set", "--cache-dir", "--log-level"):
        assert option in result.stdout


@pytest.mark.parametrize("override", ["train.epochz=3", "storage.connect_seconds=nan", "model.channels=99999999"])
def test_bad_override_exits_2_before_any_work(tmp_path, override):
    run = tmp_path / "run"
    result = run_job("train", "--preset", "smoke", "--run-uri", str(run), "--set", override)
    assert result.returncode == 2, result.stderr
    assert override.split("=")[0] in result.stderr
    assert not run.exists()


def test_unknown_mode_and_preset_exit_2(tmp_path):
    assert run_job("fly").returncode == 2
    result = run_job("train", "--preset", "huge", "--run-uri", str(tmp_path / "r"))
    assert result.returncode == 2 and "huge" in result.stderr


def test_env_selects_preset_and_run_uri(tmp_path):
    run = tmp_path / "from-env"
    env = job_env(JOB_PRESET="smoke", JOB_RUN_URI=str(run), JOB_LOG_LEVEL="WARNING")
    result = run_job("generate", env=env)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["num_samples"] == build_config("smoke").data.num_samples
