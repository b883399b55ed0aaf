"""The promise of SPEC §7 and §15: a run SIGKILLed at random moments, in either stage, and started
again any number of times, ends with final checkpoints whose .safetensors files are byte-identical
to the uninterrupted run's, for the tokenizer and for the stage-2 transformer.

One drill, three ways a user runs the job: a local run folder; an s3:// run folder with a new,
empty cache at every start (a new container); and entrypoint.sh, as the image starts it under
`--restart on-failure`. The kill moments come from KILL_SEED (printed; set it to replay a
failure)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from job.checkpoints.format import MODEL_FILE, STATE_FILE, decode_state, encode_state
from job.exits import EXIT_BAD_DATA, EXIT_USAGE
from tests.helpers import (
    ENTRYPOINT,
    SMOKE_STAGE2_STEPS,
    SMOKE_STEPS,
    TRAINING,
    JobProcess,
    job_command,
    job_env,
    run_job,
)

pytestmark = pytest.mark.timeout(600)
KILLS = 4
# The final checkpoint of each stage, and the files compared byte for byte.
FINALS = [
    f"checkpoints/step-{SMOKE_STEPS:08d}",
    f"stage2/checkpoints/step-{SMOKE_STAGE2_STEPS:08d}",
]


def final_files(read) -> dict[str, str]:
    """sha256 of both stages' final weights files, and of their optimizer and random states (the
    tensors of state.safetensors: its JSON metadata counts attempts and times epochs), by path."""
    hashes = {}
    for folder in FINALS:
        hashes[f"{folder}/{MODEL_FILE}"] = hashlib.sha256(read(f"{folder}/{MODEL_FILE}")).hexdigest()
        optimizer, rng, _ = decode_state(read(f"{folder}/{STATE_FILE}"))
        hashes[f"{folder}/{STATE_FILE}"] = hashlib.sha256(encode_state(optimizer, rng, b"{}")).hexdigest()
    return hashes


def tensorboard_steps(run, folder: str, tmp_path) -> list[int]:
    """The steps of the train_loss values in a stage's event files, file after file."""
    steps = []
    for rel in run.listed(folder):
        copy = tmp_path / "events" / rel
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(run.read(rel))
        steps += [e.step for e in EventFileLoader(str(copy)).Load() for v in e.summary.value if v.tag == "train_loss"]
    return steps


class LocalRun:
    def __init__(self, tmp_path, request):
        self.run = tmp_path / "run"

    def start(self, attempt: int) -> JobProcess:
        return JobProcess.job("train", "--preset", "smoke", "--run-uri", str(self.run))

    def read(self, rel: str) -> bytes:
        return (self.run / rel).read_bytes()

    def attempts(self) -> int:
        return json.loads((self.run / "progress.json").read_text())["attempt"]

    def listed(self, folder: str) -> list[str]:
        return sorted(f"{folder}/{p.name}" for p in (self.run / folder).iterdir())

    @property
    def uri(self) -> str:
        return str(self.run)


class BucketRun:
    """A new container at every start: the run lives in the bucket, the cache starts empty."""

    def __init__(self, tmp_path, request):
        self.s3 = request.getfixturevalue("s3")
        self.tmp_path = tmp_path

    def start(self, attempt: int) -> JobProcess:
        cache = self.tmp_path / f"cache-{attempt}"
        return JobProcess.job("train", "--preset", "smoke", "--run-uri", self.s3.uri(), "--cache-dir", str(cache))

    def read(self, rel: str) -> bytes:
        return self.s3.get(f"run/{rel}")

    def attempts(self) -> int:
        return json.loads(self.s3.get("run/progress.json"))["attempt"]

    def listed(self, folder: str) -> list[str]:
        return sorted(key.removeprefix("run/") for key in self.s3.keys(f"run/{folder}/"))

    @property
    def uri(self) -> str:
        return self.s3.uri()


class ContainerRun(BucketRun):
    """What `docker run --restart on-failure -e JOB_PRESET=smoke -e JOB_RUN_URI=s3://...` starts:
    the entrypoint, with only the container's environment and an empty cache."""

    def start(self, attempt: int) -> JobProcess:
        workdir = self.tmp_path / f"container-{attempt}"
        workdir.mkdir()
        env = {k: v for k, v in job_env().items() if not k.startswith("AWS_")}
        env.update(PYTHON=job_command()[0], JOB_PRESET="smoke", JOB_RUN_URI=self.s3.uri(),
                   JOB_CACHE_DIR=str(workdir / "cache"), **self.s3.env)
        return JobProcess([str(ENTRYPOINT), "train", "--set", "storage.retry_max_seconds=2"], env=env, cwd=workdir)


@pytest.mark.parametrize("where", [LocalRun, BucketRun, ContainerRun], ids=["local", "s3", "entrypoint"])
def test_sigkill_at_random_moments_resumes_to_identical_weights(where, tmp_path, request, smoke_baseline):
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    print(f"kill seed: {seed} (rerun with KILL_SEED={seed})")
    rng = random.Random(seed)
    run = where(tmp_path, request)
    kills, codes = 0, []
    for attempt in range(40):
        job = run.start(attempt)
        if kills < KILLS and job.wait_for(*TRAINING, timeout=120):
            try:
                job.proc.wait(timeout=rng.uniform(0.05, 0.5))  # a random moment, or its natural end
            except subprocess.TimeoutExpired:
                job.send_signal(signal.SIGKILL)
                kills += 1
        codes.append(job.wait(timeout=240))
        if codes[-1] == 0:
            break
        assert codes[-1] not in (EXIT_USAGE, EXIT_BAD_DATA), f"kill seed {seed}: {job.output[-3000:]}"
    print(f"exit codes of the starts: {codes}")
    assert codes[-1] == 0, f"kill seed {seed}: no start succeeded"
    assert kills == KILLS, f"kill seed {seed}: the run finished after {kills} kills"

    expected = final_files(lambda rel: (smoke_baseline / rel).read_bytes())
    assert final_files(run.read) == expected, f"kill seed {seed}"
    for events, metrics in (("tensorboard/tokenizer", "metrics.jsonl"), ("tensorboard/transformer", "stage2/metrics.jsonl")):
        # TensorBoard's own reader finds each epoch once, in order, across the attempts' files.
        epochs = [json.loads(line)["step"] for line in run.read(metrics).decode().splitlines()]
        assert tensorboard_steps(run, events, tmp_path) == epochs, f"kill seed {seed}: {events}"
    assert run.attempts() >= KILLS + 1
    status = run_job("status", run.uri, "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["status"] == "completed" and report["health"] == "completed"
    assert report["stage"] == 2 and report["newest_checkpoint"]["folder"] == FINALS[1]
