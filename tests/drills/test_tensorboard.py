"""TensorBoard's view of a run (docs/run-page.md): a smoke run SIGKILLed in stage 1 and resumed,
its event files read back with TensorBoard's own reader, holds every epoch of both stages exactly
once and in order, and each attempt's file only the epochs that attempt trained (or, for an
epoch whose events the kill cut off after its checkpoint, the next attempt's)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from tests.helpers import JobProcess

pytestmark = pytest.mark.timeout(400)


def epochs_by_file(folder: Path) -> dict[str, list[int]]:
    """Event file -> the steps of its train_loss values, in file order."""
    return {
        f.name: [e.step for e in EventFileLoader(str(f)).Load() for v in e.summary.value if v.tag == "train_loss"]
        for f in sorted(folder.iterdir())
    }


def metric_steps(run: Path, rel: str) -> list[int]:
    return [json.loads(line)["step"] for line in (run / rel).read_text().splitlines()]


def test_a_killed_and_resumed_run_holds_each_epoch_once(tmp_path):
    run = tmp_path / "run"
    first = JobProcess.job("train", "--preset", "smoke", "--run-uri", str(run))
    # Killed in stage 1's third epoch: after two epochs and the checkpoints that followed them.
    first.wait_for('"train.epoch"', timeout=200, times=2)
    first.wait_for('"train.progress"', timeout=60, times=first.output.count('"train.progress"') + 2)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    second = JobProcess.job("train", "--preset", "smoke", "--run-uri", str(run))
    assert second.wait(timeout=300) == 0, second.output[-3000:]
    resumed = second.events("train.resumed")[0]
    assert resumed["stage"] == 1 and resumed["epoch"] >= 2, resumed

    tokenizer = epochs_by_file(run / "tensorboard" / "tokenizer")
    assert [name.rsplit(".", 1)[-1] for name in tokenizer] == ["attempt-001", "attempt-002"], tokenizer
    first_file, second_file = tokenizer.values()
    epoch_steps = metric_steps(run, "metrics.jsonl")  # the step at the end of each epoch
    done = resumed["epoch"]  # epochs the resumed checkpoint had finished
    assert first_file + second_file == epoch_steps  # each epoch once, in order
    assert set(first_file) <= set(epoch_steps[:done])  # attempt 1: only epochs it trained and committed
    assert set(epoch_steps[done:]) <= set(second_file)  # attempt 2: every epoch it trained (and one
    # of attempt 1's whose events the kill cut off after its commit, if so)
    transformer = epochs_by_file(run / "tensorboard" / "transformer")
    assert list(transformer.values()) == [metric_steps(run, "stage2/metrics.jsonl")]  # stage 2: attempt 2 alone
    pictures = [e.step for f in sorted((run / "tensorboard" / "tokenizer").iterdir())
                for e in EventFileLoader(str(f)).Load() for v in e.summary.value if v.tag == "reconstruction"]
    assert pictures == sorted(set(pictures)) and set(pictures) <= set(epoch_steps)  # each at most once, in order
    assert set(epoch_steps[done:]) <= set(pictures)  # the attempt that finished drew every epoch it trained
