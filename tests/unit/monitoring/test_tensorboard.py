"""TensorBoard events of a stage (job.monitoring.tensorboard), read back with TensorBoard's own
event reader: each epoch once, in order, across attempts; pictures only with their commit."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from job.monitoring.tensorboard import TensorBoardLog
from job.storage import Layout, RunStore

pytestmark = pytest.mark.timeout(60)

PNG = bytes.fromhex(  # a 1x1 grey PNG
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b550000000a49444154789c636800000082008177cd72b6"
    "0000000049454e44ae426082"
)


def record(epoch: int) -> dict:
    return {"epoch": epoch, "step": 10 * epoch, "train_loss": 1.0 / epoch, "val_loss": 2.0 / epoch, "lr": 0.001,
            "samples": 80, "seconds": 2.0, "attempt": 1, "time": f"2026-01-01T00:00:0{epoch}+00:00"}


def events(run) -> dict[str, list[tuple[str, int]]]:
    """file name -> (tag, step) of every value, in file order."""
    folder = run / Layout.tokenizer.tensorboard
    return {
        f.name: [(v.tag, e.step) for e in EventFileLoader(str(f)).Load() for v in e.summary.value]
        for f in sorted(folder.iterdir())
    }


def test_epochs_are_written_once_when_committed_and_each_attempt_writes_only_its_own(tmp_path):
    store = RunStore(tmp_path)
    metrics = [record(e) for e in range(1, 5)]
    first = TensorBoardLog(store, Layout.tokenizer, attempt=1, history=[])
    first.picture(1, 10, PNG)  # drawn before its checkpoint is committed: waits
    first.committed(2, metrics[:2])
    first.committed(2, metrics[:3])  # the same commit told twice, or epoch 3 not yet committed
    first.picture(3, 30, PNG)  # epoch 3 is trained but never committed: the kill comes now
    first.close()
    # attempt 2 resumes from the checkpoint of epoch 2 and trains epochs 3 and 4 again
    second = TensorBoardLog(store, Layout.tokenizer, attempt=2, history=metrics[:2])
    second.picture(2, 20, PNG)  # not an epoch this attempt trained
    second.committed(4, metrics)
    second.picture(4, 40, PNG)
    second.close()

    files = events(tmp_path)
    assert [name.rsplit(".", 1)[-1] for name in files] == ["attempt-001", "attempt-002"]
    one, two = files.values()
    assert [s for t, s in one if t == "val_loss"] == [10, 20]
    assert [s for t, s in two if t == "val_loss"] == [30, 40]
    assert [s for t, s in one if t == "reconstruction"] == [10]
    assert [s for t, s in two if t == "reconstruction"] == [40]
    every = [step for values in files.values() for tag, step in values if tag == "train_loss"]
    assert every == [10, 20, 30, 40]  # each epoch exactly once, in order
    assert ("samples_per_second", 10) in one  # derived: samples / seconds


def test_an_epoch_whose_events_a_kill_cut_off_after_its_commit_is_written_by_the_next_attempt(tmp_path):
    store = RunStore(tmp_path)
    metrics = [record(e) for e in range(1, 4)]
    first = TensorBoardLog(store, Layout.tokenizer, attempt=1, history=[])
    first.committed(1, metrics[:1])
    first.close()
    # The checkpoint of epoch 2 was committed, then the kill came: its events were never written,
    # and the last record of the file was cut in half.
    folder = tmp_path / Layout.tokenizer.tensorboard
    (path,) = folder.iterdir()
    path.write_bytes(path.read_bytes() + path.read_bytes()[-30:-7])
    second = TensorBoardLog(store, Layout.tokenizer, attempt=2, history=metrics[:2])
    second.committed(3, metrics)
    second.close()
    steps = [s for values in events(tmp_path).values() for tag, s in values if tag == "train_loss"]
    assert steps == [10, 20, 30]
