"""The command line in process (job.cli): each kind of failure becomes the exit code SPEC §3
promises, with one line on stderr, and argument errors answer before any work."""

from __future__ import annotations

import errno

import pytest

from job.cli import main, run_mode
from job.config import ConfigError
from job.data.shards import DataError
from job.exits import EXIT_BAD_DATA, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE
from job.runtime.files import DiskFull
from job.runtime.signals import Stopped
from job.storage import StorageError
from job.training.trainer import Preempted
from job.training.startup import ResumeRefused

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
