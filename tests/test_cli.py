"""The command line in process: each kind of failure becomes the exit code SPEC §3 promises, with
one line on stderr, and argument errors answer before any work."""

from __future__ import annotations

import errno
import time

import pytest

from job.cli import main, run_mode
from job.config import ConfigError
from job.data.shards import DataError
from job.exits import EXIT_BAD_DATA, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE
from job.runtime.files import DiskFull
from job.runtime.signals import Stopped
from job.storage import StorageError
from job.training.loop import Preempted
from job.training.startup import ResumeRefused
from tests.helpers import FAKE_SECRET, REFUSALS, job_env, run_job

pytestmark = pytest.mark.timeout(150)


def raising(exc: BaseException):
    def body() -> int:
        raise exc

    return body


@pytest.mark.parametrize(
    "exc, code",
    [
        (Preempted("stopped by SIGTERM at step 7"), EXIT_PREEMPTED),
        (Stopped("stopped by SIGTERM while generating the dataset"), EXIT_PREEMPTED),
        (ConfigError("train.epochs: must be > 0"), EXIT_USAGE),
        (ResumeRefused("refusing to resume: different model.channels"), EXIT_USAGE),
        (DataError("sample 3: label 9 outside 0..3"), EXIT_BAD_DATA),
        (StorageError("run URI s3://b/r is not reachable after 300 s"), EXIT_FAILED),
        (DiskFull(errno.ENOSPC, "no space left on device writing /r/progress.json: 0 bytes free there"), EXIT_FAILED),
        (KeyboardInterrupt(), EXIT_FAILED),
        (RuntimeError("anything else"), EXIT_FAILED),
    ],
)
def test_each_failure_maps_to_its_exit_code_and_one_line_on_stderr(exc, code, capsys):
    assert run_mode("train", raising(exc)) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(exc) in err


def test_a_mode_that_returns_passes_its_code_through():
    assert run_mode("verify", lambda: EXIT_OK) == EXIT_OK
    assert run_mode("verify", lambda: EXIT_FAILED) == EXIT_FAILED


def test_status_without_a_run_uri_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.delenv("JOB_RUN_URI", raising=False)
    assert main(["status"]) == EXIT_USAGE
    assert "status needs RUN_URI" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["nosuchmode"], ["train", "--log-level", "LOUD"], []])
def test_bad_arguments_exit_2_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE


# --- a store that refuses us for good: exit 2 at once, naming what to fix ----------------------

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
