"""Checkpoints as `train` processes meet them: a run whose checkpoints are all invalid is refused,
a run killed before its first commit starts fresh, and a loss that becomes non-finite stops the
run and says so."""

from __future__ import annotations

import hashlib
import json

import pytest

from job.checkpoints.format import MODEL_FILE
from job.checkpoints.reader import CheckpointReader
from job.storage import Layout, RunStore
from tests.helpers import JobProcess
from tests.smoke_parts import CFG, fresh_parts, manager, save_at

pytestmark = pytest.mark.timeout(150)


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
