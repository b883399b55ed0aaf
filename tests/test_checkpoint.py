"""Checkpoint format, commit order, verification and pruning, in process on a smoke model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from job.checkpoint import MANIFEST_FILE, MODEL_FILE, CheckpointError, Checkpointer, encode_checkpoint, restore
from job.config import build_config
from job.fsutil import atomic_write_bytes
from job.model import VideoTokenizer
from job.storage import Layout, RunStore
from job.train import Position, build_training, state_from

pytestmark = pytest.mark.timeout(60)
CFG = build_config("smoke")


def state(step: int) -> dict:
    return state_from(Position(step=step), CFG, reason="steps")


def fresh(seed: int = 0):
    model, optimizer, scheduler = build_training(CFG, torch.device("cpu"), total_steps=100)
    torch.manual_seed(seed)
    return model, optimizer, scheduler


def one_step(model, optimizer, scheduler, video=None) -> None:
    if video is None:
        video = torch.rand(2, 1, CFG.data.frames, CFG.data.height, CFG.data.width)
    loss = model(video).recon.mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


class RecordingStore(RunStore):
    """A real local store that also remembers the order of its writes."""

    def __init__(self, uri):
        super().__init__(uri)
        self.writes: list[str] = []

    def write_bytes(self, rel, data):
        self.writes.append(rel)
        super().write_bytes(rel, data)


def test_same_weights_give_the_same_bytes():
    a, b = VideoTokenizer(CFG.model, CFG.data), VideoTokenizer(CFG.model, CFG.data)
    b.load_state_dict(a.state_dict())
    _, optimizer, scheduler = fresh()
    first = encode_checkpoint(a, optimizer, scheduler, state={})[MODEL_FILE]
    second = encode_checkpoint(b, optimizer, scheduler, state={})[MODEL_FILE]
    assert first == second
    with torch.no_grad():
        next(b.parameters()).add_(1e-6)
    assert encode_checkpoint(b, optimizer, scheduler, state={})[MODEL_FILE] != first


def test_commit_order_files_then_manifest_then_latest(tmp_path):
    store = RecordingStore(str(tmp_path))
    model, optimizer, scheduler = fresh()
    name = Checkpointer(store, keep_last=2).save(7, 0, model, optimizer, scheduler, state(7))
    assert name == "step-00000007"
    assert store.writes[-2:] == [Layout.checkpoint_file(name, MANIFEST_FILE), Layout.latest]
    assert len(store.writes) == 6
    assert json.loads((tmp_path / Layout.latest).read_text()) == {"checkpoint": name, "step": 7}


def test_restore_puts_back_model_optimizer_schedule_and_rng(tmp_path):
    store = RunStore(str(tmp_path))
    model, optimizer, scheduler = fresh()
    one_step(model, optimizer, scheduler)
    name = Checkpointer(store, keep_last=2).save(1, 0, model, optimizer, scheduler, state(1))
    expected_next = torch.rand(3)

    loaded = Checkpointer(store, keep_last=2).load(name)
    model2, optimizer2, scheduler2 = fresh(seed=123)
    restore(loaded, model2, optimizer2, scheduler2)
    assert torch.equal(torch.rand(3), expected_next)  # the generator continues where it was saved
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert scheduler2.last_epoch == scheduler.last_epoch
    # the optimizer's moments came back too: one more identical step lands on identical weights
    video = torch.rand(2, 1, CFG.data.frames, CFG.data.height, CFG.data.width)
    one_step(model, optimizer, scheduler, video)
    one_step(model2, optimizer2, scheduler2, video)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_damaged_or_unmanifested_checkpoints_are_refused(tmp_path):
    store = RunStore(str(tmp_path))
    checkpointer = Checkpointer(store, keep_last=5)
    model, optimizer, scheduler = fresh()
    for step in (1, 2, 3):
        checkpointer.save(step, 0, model, optimizer, scheduler, state(step))
    weights = tmp_path / Layout.checkpoint_file("step-00000003", MODEL_FILE)
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    atomic_write_bytes(weights, bytes(data))
    os.remove(tmp_path / Layout.checkpoint_file("step-00000002", MANIFEST_FILE))

    with pytest.raises(CheckpointError, match="sha256"):
        checkpointer.load("step-00000003")
    with pytest.raises(CheckpointError, match="manifest"):
        checkpointer.load("step-00000002")
    assert checkpointer.load_newest_valid().name == "step-00000001"


def test_each_commit_prunes_to_last_k_and_the_best(tmp_path):
    store = RunStore(str(tmp_path))
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-00000000").mkdir(parents=True)  # an older leftover that never committed
    (checkpoints / "step-00000009").mkdir()  # a leftover from a later step: not replaced yet
    checkpointer = Checkpointer(store, keep_last=2)
    model, optimizer, scheduler = fresh()
    for step in range(1, 6):
        checkpointer.save(step, 0, model, optimizer, scheduler, state(step), best="step-00000002")
    assert checkpointer.committed() == ["step-00000002", "step-00000004", "step-00000005"]
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest.json", "step-00000002", "step-00000004", "step-00000005", "step-00000009",
    ]
