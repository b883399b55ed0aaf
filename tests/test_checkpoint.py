"""Checkpoints in process on a smoke model: format, commit order, restore of every stateful part,
verification, the manifest's rules, and the manager's cadence, best tracking and pruning."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from job.checkpoints.format import MANIFEST_FILE, MODEL_FILE, STATE_FILE, RNGState, take_snapshot, tensor_file
from job.checkpoints.manager import FINAL, CheckpointManager, Diverged
from job.checkpoints.reader import CheckpointError, CheckpointReader, ManifestMismatch, UnreadableCheckpoint
from job.checkpoints.train_state import TrainState
from job.config import build_config, set_value
from job.models.tokenizer import initial_tokenizer
from job.runtime.files import atomic_write_bytes
from job.storage import Layout, RunStore
from job.training.optim import build_optimizer
from tests.helpers import FakeClock, JobProcess

pytestmark = pytest.mark.timeout(150)
CFG = build_config("smoke")


def fresh_parts(seed: int = 0, step: int = 0) -> dict:
    model = initial_tokenizer(CFG)
    optimizer, scheduler = build_optimizer(model, CFG, total_steps=100)
    torch.manual_seed(seed)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": RNGState(), "train": TrainState(step=step)}


def manager(store, parts, keep_last: int = 2, clock=None, **cadence) -> CheckpointManager:
    cfg = build_config("smoke")
    set_value(cfg, "checkpoint.keep_last", keep_last)
    for key, value in cadence.items():
        set_value(cfg, f"checkpoint.{key}", value)
    return CheckpointManager(
        store, Layout.tokenizer, cfg.checkpoint, parts, extra={"config": CFG.to_dict()}, inventory=CheckpointReader(store).inventory(),
        clock=clock or FakeClock(),
    )


def save_at(checkpoints: CheckpointManager, step: int, reason: str = FINAL, val_loss: float | None = None) -> str:
    checkpoints.state.step = step
    name = checkpoints.save(reason, val_loss)
    checkpoints.wait()
    return name


def one_step(parts: dict, video=None) -> None:
    if video is None:
        video = torch.rand(2, 1, CFG.data.frames, CFG.data.height, CFG.data.width)
    loss = parts["model"](video).recon.mean()
    parts["optimizer"].zero_grad()
    loss.backward()
    parts["optimizer"].step()
    parts["scheduler"].step()


class RecordingStore(RunStore):
    """A real local store that also remembers the order of its writes."""

    def __init__(self, uri):
        super().__init__(uri)
        self.writes: list[str] = []

    def write_bytes(self, rel, data):
        self.writes.append(rel)
        super().write_bytes(rel, data)


def test_same_weights_give_the_same_bytes():
    a, b = fresh_parts(), fresh_parts()
    b["model"].load_state_dict(a["model"].state_dict())
    first = take_snapshot(a, {}).encode()[MODEL_FILE]
    assert take_snapshot(b, {}).encode()[MODEL_FILE] == first
    with torch.no_grad():
        next(b["model"].parameters()).add_(1e-6)
    assert take_snapshot(b, {}).encode()[MODEL_FILE] != first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_either_safetensors_front_end_writes_the_same_bytes(dtype):
    """Small files go through safetensors' numpy front end (less Python per tensor), bfloat16
    and large ones through its torch one: a checkpoint's bytes must not depend on which."""
    snapshot = take_snapshot(one_stepped(fresh_parts()), {"config": CFG.to_dict()})
    tensors = {**snapshot.model, "extra": torch.arange(6).reshape(2, 3).to(dtype)}
    metadata = {"state": snapshot.state_json.decode()}
    data = tensor_file(tensors, metadata)
    assert data == save_tensors(tensors, metadata=metadata)
    assert all(torch.equal(load_tensors(data)[k], t) for k, t in tensors.items())


def one_stepped(parts: dict) -> dict:
    one_step(parts)
    return parts


def test_a_snapshot_leaves_torch_threads_as_training_set_them():
    """The copy runs on one thread (see _host_copy); training's setting comes back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        take_snapshot(fresh_parts(), {})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_commit_order_files_then_manifest_then_latest(tmp_path):
    store = RecordingStore(str(tmp_path))
    name = save_at(manager(store, fresh_parts()), 7)
    assert name == "step-00000007"
    assert store.writes == [
        *(Layout.checkpoint_file(name, f) for f in (MODEL_FILE, STATE_FILE, MANIFEST_FILE)), Layout.latest,
    ]
    assert json.loads((tmp_path / Layout.latest).read_text()) == {"checkpoint": name, "step": 7}


def test_restore_puts_back_every_part(tmp_path):
    store = RunStore(str(tmp_path))
    parts = fresh_parts()
    one_step(parts)
    parts["train"].sample_in_epoch, parts["train"].metrics = 16, [{"epoch": 1}]
    name = save_at(manager(store, parts), 1)
    expected_next = torch.rand(3)

    restored = fresh_parts(seed=123)
    CheckpointReader(store).load(name).restore(restored)
    assert torch.equal(torch.rand(3), expected_next)  # the generator continues where it was saved
    assert restored["train"] == parts["train"]
    for p, q in zip(parts["model"].parameters(), restored["model"].parameters()):
        assert torch.equal(p, q)
    assert restored["scheduler"].last_epoch == parts["scheduler"].last_epoch
    # the optimizer's moments came back too: one more identical step lands on identical weights
    video = torch.rand(2, 1, CFG.data.frames, CFG.data.height, CFG.data.width)
    one_step(parts, video)
    one_step(restored, video)
    for p, q in zip(parts["model"].parameters(), restored["model"].parameters()):
        assert torch.equal(p, q)


def test_damaged_or_unmanifested_checkpoints_are_refused(tmp_path):
    store = RunStore(str(tmp_path))
    checkpoints = manager(store, fresh_parts(), keep_last=5)
    for step in (1, 2, 3):
        save_at(checkpoints, step)
    weights = tmp_path / Layout.checkpoint_file("step-00000003", MODEL_FILE)
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    atomic_write_bytes(weights, bytes(data))
    os.remove(tmp_path / Layout.checkpoint_file("step-00000002", MANIFEST_FILE))

    reader = CheckpointReader(store)
    with pytest.raises(CheckpointError, match="sha256"):
        reader.load("step-00000003")
    with pytest.raises(CheckpointError, match="manifest"):
        reader.load("step-00000002")
    assert reader.load_newest_valid().name == "step-00000001"


def test_a_checkpoint_of_the_three_file_format_is_refused_naming_its_format(tmp_path):
    """Format 1 kept optimizer, rng and state in three files; its manifest says so, and this job
    does not read it (a resume starts from the newest checkpoint it can read)."""
    store = RunStore(str(tmp_path))
    name = save_at(manager(store, fresh_parts()), 1)
    manifest_path = tmp_path / Layout.checkpoint_manifest(name)
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "format": 1}))
    with pytest.raises(UnreadableCheckpoint, match="checkpoint format 1, this job reads format 2 only"):
        CheckpointReader(store).load(name)


@pytest.mark.parametrize("name", ["../../x", "..", "/etc/passwd", "sub/model.safetensors", ""])
def test_a_manifest_naming_anything_but_a_plain_file_of_its_folder_is_refused(tmp_path, name):
    store = RunStore(str(tmp_path / "run"))
    checkpoint = save_at(manager(store, fresh_parts()), 1)
    outside = tmp_path / "x"
    outside.write_bytes(b"planted")
    manifest_path = tmp_path / "run" / Layout.checkpoint_manifest(checkpoint)
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(b"planted").hexdigest(), "size": 7}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestMismatch, match="not a plain file"):
        CheckpointReader(store).load(checkpoint)
    assert CheckpointReader(store).load_newest_valid() is None


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


# --- a run whose checkpoints are all invalid is not started over --------------------------------


def plant_outside_name(run, name: str, planted: str) -> None:
    """Make the manifest of ``name`` also list a path outside its folder, whose hash matches a
    file that really is there (".." is a folder: nothing can match it), so that only the name
    rule can catch it."""
    if planted.startswith("/"):
        planted = str(run / "outside")
    target = (run / Layout.checkpoint_dir(name) / planted).resolve()
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"planted")
    manifest_path = run / Layout.checkpoint_manifest(name)
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][planted] = {"sha256": hashlib.sha256(b"planted").hexdigest(), "size": 7}
    manifest_path.write_text(json.dumps(manifest))


def train_process(run, *extra: str) -> JobProcess:
    return JobProcess.job("train", "--preset", "smoke", "--run-uri", str(run), "--set", "stage2.epochs=0", *extra)


def test_train_refuses_to_start_over_a_run_whose_checkpoints_are_all_invalid(tmp_path):
    run = tmp_path / "run"
    store = RunStore(str(run))
    checkpoints = manager(store, fresh_parts(), keep_last=5)
    names = [save_at(checkpoints, step) for step in (5, 10)]
    checkpoints.close()
    for name, planted in zip(names, ("../../x", "/absolute")):  # every other name: the reader's test above
        plant_outside_name(run, name, planted)
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}

    job = train_process(run)
    assert job.wait(timeout=120) == 2, job.output[-3000:]
    assert "refusing to start tokenizer over" in job.output and "none is valid" in job.output
    assert [e["checkpoint"] for e in job.events("checkpoint.skipped")] == names[::-1]
    assert not job.events("train.fresh_start")
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == before


def test_a_run_killed_before_its_first_commit_starts_fresh(tmp_path):
    """progress.json, config.json, logs and a checkpoint folder without a manifest (a save cut
    short): nothing was ever committed, so there is nothing to lose."""
    run = tmp_path / "run"
    store = RunStore(str(run))
    store.write_json(Layout.progress, {"status": "running", "step": 3, "attempt": 1, "last_checkpoint": None})
    store.write_json(Layout.config, CFG.to_dict())
    store.write_bytes(Layout.checkpoint_file("step-00000005", MODEL_FILE), b"half written")
    job = train_process(run)
    try:
        job.wait_for('"train.fresh_start"', timeout=120)
    finally:
        job.proc.kill()
        job.wait(timeout=30)


# --- a diverged run stops, and nothing non-finite is ever committed ------------------------------


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


def test_a_run_whose_loss_becomes_non_finite_stops_and_says_so(tmp_path):
    """lr=inf is refused by the config; a huge finite one (every AdamW step moves each weight by
    about lr) is the real way a run blows up."""
    run = tmp_path / "run"
    job = train_process(run, "--set", "optim.lr=1e30")
    assert job.wait(timeout=120) == 1, job.output[-3000:]
    assert "diverged: the training loss is nan" in job.output and "optim.lr" in job.output
    assert "Traceback" not in job.output
    progress = json.loads((run / Layout.progress).read_text())
    assert progress["status"] == "failed" and "diverged" in progress["error"]
    assert not (run / Layout.checkpoints).exists() or CheckpointReader(RunStore(str(run))).committed() == []
