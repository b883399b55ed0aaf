"""SIGTERM / SIGINT in every long phase, not only in training (SPEC §3, §7): the job stops at the
phase's next boundary (a shard, a file, a checkpoint, a batch) within seconds, exits 143, marks
the run `preempted` where the mode writes progress, leaves nothing half-written that a later start
would trust, and a restart carries on.

Each phase is made long with --set, so that the signal surely lands inside it; a job that honours
the signal only pays for a shard or a batch of it."""

from __future__ import annotations

import json
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from job.config import build_config
from job.data.dataset import VideoDataset
from job.data.shards import generate_dataset
from job.storage import Layout
from tests.helpers import TOKENIZER_ONLY, JobProcess, run_job

pytestmark = pytest.mark.timeout(120)


# 120 shards of 500 smoke samples: seconds of generation, of which a stopped job does one shard.
LONG_DATA = ("--set", "data.num_samples=60000", "--set", "data.shard_size=500")
STOP_WITHIN_SECONDS = 10  # docker stop's grace period; the boundaries are a fraction of a second apart


def stop_during(proc: JobProcess, line: str, sig: int = signal.SIGTERM) -> float:
    """Signal the job once it has logged ``line``; wait for its exit (143) and return the seconds
    that took."""
    assert proc.wait_for(line, timeout=60), f"the job ended before {line}:\n{proc.output[-3000:]}"
    sent = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 143, proc.output[-3000:]
    return time.monotonic() - sent


def test_generate_stops_at_a_shard_boundary_and_the_next_run_keeps_the_shards(tmp_path):
    run = tmp_path / "run"
    data = run / "data"
    proc = JobProcess.job("generate", "--preset", "smoke", "--run-uri", str(run), *LONG_DATA)
    assert stop_during(proc, '"generate.progress"', signal.SIGINT) < STOP_WITHIN_SECONDS
    assert "stopped by SIGINT while generating the dataset" in proc.output
    assert not (data / "manifest.json").exists()  # no reader trusts a partial dataset
    assert not list(data.glob(".*.tmp"))  # the shard in hand was finished, not cut
    recorded = json.loads((data / ".partial.json").read_text())["shards"]
    assert 0 < len(recorded) < 120
    kept = {name: (data / name).stat().st_mtime_ns for shard in recorded for name in shard["files"]}

    result = run_job("generate", "--preset", "smoke", "--run-uri", str(run), *LONG_DATA)
    assert result.returncode == 0, result.stderr
    assert {name: (data / name).stat().st_mtime_ns for name in kept} == kept  # resumed, not redone
    cfg = build_config("smoke", overrides=list(LONG_DATA[1::2]))
    assert VideoDataset(data, cfg.data, verify=True).num_samples == 60000


def test_train_stops_while_generating_its_data_and_marks_the_run_preempted(tmp_path):
    run = tmp_path / "run"
    proc = JobProcess.job("train", "--preset", "smoke", "--run-uri", str(run), *LONG_DATA, *TOKENIZER_ONLY)
    assert stop_during(proc, '"generate.progress"') < STOP_WITHIN_SECONDS
    assert not proc.events("train.fresh_start") and not (run / "checkpoints").exists()
    assert not (run / "data" / "manifest.json").exists()
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "preempted" and progress["step"] == 0


def upload_tree(s3, local: Path, prefix: str) -> None:
    files = [p for p in local.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: s3.put(f"{prefix}/{p.relative_to(local)}", p.read_bytes()), files))


def test_train_stops_while_downloading_its_data_and_the_bucket_says_preempted(s3, tmp_path):
    # 60 shards in the bucket, as an earlier container on another host left them.
    many_files = ("--set", "data.num_samples=12000", "--set", "data.shard_size=200")
    local = tmp_path / "elsewhere"
    generate_dataset(build_config("smoke", overrides=many_files[1::2]).data, local)
    upload_tree(s3, local, "run/data")
    cache = tmp_path / "cache"
    args = ("train", "--preset", "smoke", "--run-uri", s3.uri(), "--cache-dir", str(cache), *many_files,
            *TOKENIZER_ONLY)

    proc = JobProcess.job(*args)
    assert stop_during(proc, '"data.download"') < STOP_WITHIN_SECONDS
    assert "stopped by SIGTERM while downloading the dataset" in proc.output
    assert not (cache / "data" / "manifest.json").exists()  # the local copy is not trusted as complete
    assert len(list((cache / "data").glob("shard-*"))) < 120
    progress = json.loads(s3.get("run/progress.json"))
    assert progress["status"] == "preempted"

    again = JobProcess.job(*args)  # fetches the rest, checks it against the manifest, trains
    stop_during(again, '"train.progress"')
    assert (cache / "data" / "manifest.json").exists()


@pytest.mark.parametrize("mode", ["train", "verify"])
def test_a_start_waiting_for_a_run_uri_that_does_not_answer_stops_at_once(mode, s3, tmp_path):
    """A start retries an unreachable store for storage.connect_seconds (minutes by default);
    docker stop must not have to wait for that, nor end it with SIGKILL."""
    s3.endpoint.stop()
    try:
        proc = JobProcess.job(
            mode, "--preset", "smoke", "--run-uri", s3.uri(), "--cache-dir", str(tmp_path / "cache"),
            "--set", "storage.connect_seconds=300",
        )
        assert stop_during(proc, '"storage.unreachable"') < STOP_WITHIN_SECONDS
        assert "stopped by SIGTERM while waiting for the run URI to answer" in proc.output
    finally:
        s3.endpoint.start()


@pytest.fixture
def trained_run(smoke_baseline, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(smoke_baseline, run)
    for written_by_a_reading_mode in (Layout.verify_report, Layout.eval, Layout.samples):
        shutil.rmtree(run / Path(written_by_a_reading_mode).parts[0], ignore_errors=True)
    return run


def many_checkpoints(run: Path, copies: int) -> None:
    """Copies of the newest tokenizer checkpoint under later names: each is read, hashed and run
    forward by verify (their step fails a check, which does not matter here)."""
    folder = run / Layout.checkpoints
    newest = sorted(folder.glob("step-*"))[-1]
    first = int(newest.name.removeprefix("step-")) + 1
    for number in range(first, first + copies):
        shutil.copytree(newest, folder / Layout.checkpoint_name(number))


@pytest.mark.parametrize("mode, line, long_phase", [
    ("verify", '"verify.start"', ()),
    ("evaluate", '"evaluate.start"', ("--set", "stage2.samples_per_class=500")),
    ("sample", '"sample.start"', ("--set", "stage2.samples_per_class=500")),
])
def test_a_reading_mode_stops_at_its_next_boundary_and_writes_no_report(trained_run, mode, line, long_phase):
    if mode == "verify":
        many_checkpoints(trained_run, 300)
    reports = {"verify": Layout.verify_report, "evaluate": "eval/report.json", "sample": "samples/index.json"}
    proc = JobProcess.job(mode, "--preset", "smoke", "--run-uri", str(trained_run), *long_phase)
    assert stop_during(proc, line) < STOP_WITHIN_SECONDS
    assert "stopped by SIGTERM while" in proc.output
    assert not (trained_run / reports[mode]).exists()  # only a finished pass writes its report
