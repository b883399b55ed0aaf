"""The checkpoint format (job.checkpoints.format) on a smoke model: byte-identical files for the
same weights, either safetensors front end, snapshots that leave torch's threads alone, and a
restore that puts back every stateful part."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from job.checkpoints.format import MODEL_FILE, take_snapshot, tensor_file
from job.checkpoints.reader import CheckpointReader
from job.storage import RunStore
from tests.smoke_parts import CFG, fresh_parts, manager, one_step, save_at

pytestmark = pytest.mark.timeout(150)


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
