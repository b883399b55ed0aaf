"""DistributedDataParallel under torchrun: 2 gloo processes on CPU against a local S3 endpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from job.config import build_config, split_sizes
from tests.helpers import HANG_AT_STEP, ROOT, job_env, log_events, run_job

pytestmark = pytest.mark.timeout(300)
SMOKE = build_config("smoke")
N_TRAIN = split_sizes(SMOKE.data)[0]


def torchrun(nproc: int, *args: str, hang_at_step: int = 0) -> list[str]:
    """torchrun of `python -m job ARGS`, or of the job with a step that never ends."""
    job = [str(HANG_AT_STEP), str(hang_at_step)] if hang_at_step else ["-m", "job"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *job, *args]


def train_args(s3, cache: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "smoke", "--run-uri", s3.uri(), "--cache-dir", str(cache),
            "--set", "storage.retry_max_seconds=2", *extra]


class Group:
    """A torchrun process group in its own session, with its output collected."""

    def __init__(self, command: list[str], **env: str):
        self.proc = subprocess.Popen(command, cwd=ROOT, env=job_env(**env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.events()):
            assert self.proc.poll() is None, f"ended before {what}:\n" + "".join(self.lines[-20:])
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.1)

    def events(self) -> list[dict]:
        return log_events("".join(line for line in list(self.lines) if line.startswith("{")))

    def workers(self) -> list[int]:
        """The training processes torchrun started (its children)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(5)
        return code


def run_group(nproc: int, *args: str, timeout: float = 180) -> tuple[int, list[dict]]:
    group = Group(torchrun(nproc, *args))
    code = group.finish(timeout)
    return code, group.events()


def bucket_checkpoints(s3) -> list[str]:
    return [k.split("/")[2] for k in s3.keys("run/checkpoints/step-") if k.endswith("/manifest.json")]


def metrics(s3) -> list[dict]:
    return [json.loads(line) for line in s3.get("run/metrics.jsonl").decode().splitlines()]


def test_two_gloo_processes_train_to_completion_and_verify_passes(s3, tmp_path):
    code, events = run_group(2, *train_args(s3, tmp_path / "cache"))
    assert code == 0
    ranks = {e.get("rank") for e in events if e["event"] == "train.progress"}
    assert ranks == {0, 1}  # logs carry the rank
    assert {e["rank"] for e in events if e["event"] == "checkpoint.saved"} == {0}  # rank 0 alone writes
    assert s3.keys("run/logs/") == ["run/logs/attempt-001.jsonl"]
    history = metrics(s3)
    assert [m["epoch"] for m in history] == list(range(1, SMOKE.train.epochs + 1))
    assert all(m["samples"] == N_TRAIN and m["samples_complete"] for m in history)
    assert json.loads(s3.get("run/progress.json"))["status"] == "completed"

    result = run_job("verify", "--preset", "smoke", "--run-uri", s3.uri(), "--cache-dir", str(tmp_path / "verify"))
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_with_another_world_size_trains_each_sample_once(s3, tmp_path, first, second):
    # Hold the group at a step inside epoch 2 (the drill's hang hook), so that the kill lands
    # there however fast the machine is; kill once the checkpoint before it is in the bucket.
    steps_per_epoch = -(-N_TRAIN // SMOKE.train.batch_size)
    every = SMOKE.checkpoint.every_steps
    checkpoint_step = (steps_per_epoch // every + 1) * every  # the first step checkpoint of epoch 2
    group = Group(torchrun(first, *train_args(s3, tmp_path / "first"), hang_at_step=checkpoint_step + 2))
    group.wait_for(lambda _: f"step-{checkpoint_step:08d}" in bucket_checkpoints(s3), 120, "a checkpoint inside epoch 2")
    # The ranks run in sessions of their own: killing torchrun's group would leave them running,
    # and the hung rank 0 would keep the run's lease.
    workers = group.workers()
    os.killpg(group.proc.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    group.finish(30)

    code, events = run_group(second, *train_args(s3, tmp_path / "second"))
    assert code == 0
    resumed = [e for e in events if e["event"] == "train.resumed" and e["stage"] == 1]
    assert len(resumed) == second and len({e["checkpoint"] for e in resumed}) == 1  # every rank, same checkpoint
    assert resumed[0]["checkpoint"] == f"step-{checkpoint_step:08d}"
    assert 0 < resumed[0]["sample_in_epoch"] < N_TRAIN
    history = metrics(s3)
    assert [m["epoch"] for m in history] == list(range(1, SMOKE.train.epochs + 1))
    for m in history:  # within the interrupted epoch too: no sample twice, none skipped
        assert m["samples"] == N_TRAIN and m["samples_complete"], m


def test_a_killed_rank_ends_the_group_promptly_and_the_restart_resumes(s3, tmp_path):
    group = Group(torchrun(2, *train_args(s3, tmp_path / "first")))
    group.wait_for(lambda events: any(e["event"] == "checkpoint.saved" for e in events), 120, "a checkpoint")
    workers = group.workers()
    assert len(workers) == 2
    killed_at = time.monotonic()
    os.kill(workers[-1], signal.SIGKILL)
    assert group.finish(60) != 0
    assert time.monotonic() - killed_at < 30, "the group hung after losing a rank"

    code, events = run_group(2, *train_args(s3, tmp_path / "second"))
    assert code == 0
    assert [e for e in events if e["event"] == "train.resumed"]
    assert json.loads(s3.get("run/progress.json"))["status"] == "completed"


def test_the_entrypoint_launches_torchrun_when_asked_for_processes(s3, tmp_path):
    env = job_env(JOB_NPROC_PER_NODE="2", PYTHON=sys.executable, PET_STANDALONE="1")
    result = subprocess.run(
        ["bash", "entrypoint.sh", *train_args(s3, tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = log_events(result.stdout)
    assert {e.get("rank") for e in events if e["event"] == "train.progress"} == {0, 1}
    assert json.loads(s3.get("run/progress.json"))["status"] == "completed"
