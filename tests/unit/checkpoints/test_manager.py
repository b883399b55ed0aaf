"""The checkpoint manager (job.checkpoints.manager) on a smoke model: commit order (local and in a
bucket), pruning to the last k and the best, the cadence, and no checkpoint with non-finite
values."""

from __future__ import annotations

import json

import pytest
import torch

from job.checkpoints.format import MANIFEST_FILE, MODEL_FILE, STATE_FILE, RNGState
from job.checkpoints.manager import FINAL, CheckpointManager, Diverged
from job.checkpoints.reader import CheckpointReader
from job.checkpoints.train_state import TrainState
from job.models.tokenizer import initial_tokenizer
from job.storage import Layout, RunStore
from job.training.optim import build_optimizer
from tests.helpers import SMOKE, FakeClock, record_sends
from tests.smoke_parts import fresh_parts, manager, one_step, save_at

pytestmark = pytest.mark.timeout(150)


class RecordingStore(RunStore):
    """A real local store that also remembers the order of its writes."""

    def __init__(self, uri):
        super().__init__(uri)
        self.writes: list[str] = []

    def write_bytes(self, rel, data):
        self.writes.append(rel)
        super().write_bytes(rel, data)


def test_commit_order_files_then_manifest_then_latest(tmp_path):
    store = RecordingStore(str(tmp_path))
    name = save_at(manager(store, fresh_parts()), 7)
    assert name == "step-00000007"
    assert store.writes == [
        *(Layout.checkpoint_file(name, f) for f in (MODEL_FILE, STATE_FILE, MANIFEST_FILE)), Layout.latest,
    ]
    assert json.loads((tmp_path / Layout.latest).read_text()) == {"checkpoint": name, "step": 7}


def test_each_commit_prunes_to_last_k_and_the_best(tmp_path):
    store = RunStore(str(tmp_path))
    checkpoints_dir = tmp_path / "checkpoints"
    (checkpoints_dir / "step-00000000").mkdir(parents=True)  # an older leftover that never committed
    (checkpoints_dir / "step-00000009").mkdir()  # a leftover from a later step: not replaced yet
    checkpoints = manager(store, fresh_parts(), keep_last=2)
    for step, val_loss in zip(range(1, 6), (0.5, 0.1, 0.3, 0.4, 0.2)):
        save_at(checkpoints, step, "epochs", val_loss)
    assert checkpoints.state.best == {"checkpoint": "step-00000002", "val_loss": 0.1}
    # What stage 2 reads: each checkpoint's own state names the best so far, itself included.
    assert [CheckpointReader(store).load(name).best for name in ("step-00000002", "step-00000005")] == ["step-00000002"] * 2
    assert CheckpointReader(store).committed() == ["step-00000002", "step-00000004", "step-00000005"]
    assert sorted(p.name for p in checkpoints_dir.iterdir()) == [
        "latest.json", "step-00000002", "step-00000004", "step-00000005", "step-00000009",
    ]


def test_the_manager_says_when_a_checkpoint_is_due(tmp_path):
    clock = FakeClock()
    checkpoints = manager(RunStore(str(tmp_path)), fresh_parts(), clock=clock, every_epochs=2, every_steps=5,
                          every_minutes=1.0)
    state = checkpoints.state
    state.step, state.epoch = 3, 1
    assert checkpoints.due(at_epoch_end=True) is None
    state.epoch = 2
    assert checkpoints.due(at_epoch_end=True) == "epochs"
    assert checkpoints.due(at_epoch_end=False) is None  # epochs count only at an epoch's end
    state.step = 10
    assert checkpoints.due(at_epoch_end=False) == "steps"
    state.step = 11
    clock.now += 59
    assert checkpoints.due(at_epoch_end=False) is None
    clock.now += 1
    assert checkpoints.due(at_epoch_end=False) == "minutes"
    save_at(checkpoints, 11, "minutes")
    assert checkpoints.due(at_epoch_end=False) is None  # the minutes count from the last save


# --- nothing non-finite is ever committed --------------------------------------------------------


@pytest.mark.parametrize("where", ["weights", "optimizer", "val_loss"])
def test_a_checkpoint_with_non_finite_values_is_never_committed(tmp_path, where):
    store = RunStore(str(tmp_path))
    parts = fresh_parts()
    one_step(parts)  # the optimizer has moments to check
    checkpoints = manager(store, parts, keep_last=5)
    finite = save_at(checkpoints, 5)
    val_loss = None
    if where == "weights":
        with torch.no_grad():
            next(parts["model"].parameters())[0] = float("nan")
    elif where == "optimizer":
        moments = next(iter(parts["optimizer"].state.values()))
        moments["exp_avg_sq"].view(-1)[-1] = float("inf")
    else:
        val_loss = float("inf")
    with pytest.raises(Diverged, match="not saving step-00000010") as refused:
        save_at(checkpoints, 10, "epochs", val_loss)
    if where == "optimizer":
        assert "optimizer state state.0.exp_avg_sq" in str(refused.value)
    checkpoints.close()
    assert CheckpointReader(store).names() == [finite]
    assert json.loads((tmp_path / Layout.latest).read_text())["checkpoint"] == finite
    assert checkpoints.state.best is None  # a NaN validation loss never becomes the best


def smoke_manager(store: RunStore, step: int):

    model = initial_tokenizer(SMOKE)
    optimizer, scheduler = build_optimizer(model, SMOKE, total_steps=10)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": RNGState(), "train": TrainState(step=step)}
    return CheckpointManager(store, Layout.tokenizer, SMOKE.checkpoint, parts, extra={"config": SMOKE.to_dict()}, inventory={})


@pytest.mark.timeout(300)
def test_remote_commit_order_is_files_then_manifest_then_latest(s3, tmp_path):

    store = RunStore(s3.uri("order"), tmp_path / "cache")
    sent = record_sends(store)
    smoke_manager(store, step=3).save(FINAL)
    store.flush(30)
    store.close()
    name = "step-00000003"
    assert sent[-2:] == [f"checkpoints/{name}/manifest.json", "checkpoints/latest.json"]
    assert sorted(sent[:-2]) == [f"checkpoints/{name}/{f}" for f in ("model.safetensors", "state.safetensors")]


@pytest.mark.timeout(300)
def test_checkpoints_this_attempt_committed_are_pruned_from_the_bucket_without_a_trace(s3, tmp_path):
    """They are deleted by name, not by listing the bucket: nothing of them may stay behind."""
    store = RunStore(s3.uri("prune-own"), tmp_path / "cache")
    checkpoints = smoke_manager(store, step=0)
    for step in range(1, 5):
        checkpoints.state.step = step
        checkpoints.save("steps")
    checkpoints.wait()
    store.flush(30)
    store.close()
    kept = [Layout.checkpoint_name(s) for s in (3, 4)]  # keep_last = 2
    assert SMOKE.checkpoint.keep_last == 2
    assert s3.keys("prune-own/checkpoints/") == sorted(
        [f"prune-own/{Layout.latest}"]
        + [f"prune-own/{Layout.checkpoint_file(n, f)}" for n in kept for f in ("manifest.json", "model.safetensors", "state.safetensors")]
    )


@pytest.mark.timeout(300)
def test_a_resume_heals_bucket_files_that_rotted_from_a_cache_that_verifies_and_leaves_the_rest(s3, tmp_path):
    store = RunStore(s3.uri("heal"), tmp_path / "cache")
    checkpoints = smoke_manager(store, step=0)
    for step in (1, 2):
        checkpoints.state.step = step
        checkpoints.save("steps")
    checkpoints.wait()
    store.flush(30)
    store.close()
    first, second = (Layout.checkpoint_name(s) for s in (1, 2))
    good = {name: s3.get(f"heal/{Layout.checkpoint_file(name, MODEL_FILE)}") for name in (first, second)}
    for name in (first, second):  # bit rot in the bucket's copies of both
        s3.put(f"heal/{Layout.checkpoint_file(name, MODEL_FILE)}", good[name][:-1] + bytes([good[name][-1] ^ 1]))
    rotten_cache = tmp_path / "cache" / Layout.checkpoint_file(first, STATE_FILE)
    rotten_cache.write_bytes(rotten_cache.read_bytes()[:-1])  # the first one's cached copy is damaged too

    from job.checkpoints.manager import mirror_unsent

    resumed = RunStore(s3.uri("heal"), tmp_path / "cache")
    sent = record_sends(resumed)
    mirror_unsent(resumed, Layout.tokenizer)
    resumed.flush(30)
    resumed.close()
    assert sent == [Layout.checkpoint_file(second, MODEL_FILE)]  # only what was damaged, from a copy that verifies
    assert s3.get(f"heal/{Layout.checkpoint_file(second, MODEL_FILE)}") == good[second]
    assert s3.get(f"heal/{Layout.checkpoint_file(first, MODEL_FILE)}") != good[first]  # skipped by readers, as before
