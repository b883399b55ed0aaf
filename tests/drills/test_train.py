"""train on a local run folder: the §4 layout, checkpoints, and automatic, byte-exact resume."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers import (
    SMOKE,
    SMOKE_STEPS,
    JobProcess,
    checkpoint_state,
    final_model,
    log_events,
    rewrite_state,
    run_job,
    sha256,
)
from tests.helpers import SMOKE_STAGE2_STEPS as STAGE2_STEPS

pytestmark = pytest.mark.timeout(300)

PROGRESS_FIELDS = {
    "status", "mode", "epoch", "epochs", "step", "total_steps", "loss", "samples_per_second",
    "eta_seconds", "started_at", "updated_at", "heartbeat_at", "attempt", "last_checkpoint",
}


def committed_checkpoints(run: Path) -> list[str]:
    return sorted(p.parent.name for p in (run / "checkpoints").glob("step-*/manifest.json"))


def test_run_folder_layout_after_a_smoke_run(smoke_baseline):
    run = smoke_baseline
    progress = json.loads((run / "progress.json").read_text())
    assert PROGRESS_FIELDS <= set(progress)
    # train runs the tokenizer, then stage 2: progress ends on the last stage
    assert progress["status"] == "completed" and progress["step"] == progress["total_steps"] == STAGE2_STEPS
    assert progress["stage"] == progress["stages"] == 2 and progress["stage_name"] == "transformer"
    assert progress["attempt"] == 1 and progress["last_checkpoint"] == f"step-{STAGE2_STEPS:08d}"
    assert "completed" in (run / "PROGRESS.txt").read_text()
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == SMOKE.train.epochs

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, SMOKE.train.epochs + 1))
    for m in metrics:
        assert {"train_loss", "val_loss", "lr", "codebook_usage", "codebook_perplexity", "seconds"} <= set(m)

    events = [json.loads(line) for line in (run / "logs" / "attempt-001.jsonl").read_text().splitlines()]
    names = [e["event"] for e in events]
    assert "train.progress" in names and "train.epoch" in names and "checkpoint.saved" in names
    assert all(e["attempt"] == 1 and "timestamp" in e and "level" in e for e in events)

    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest == {"checkpoint": f"step-{SMOKE_STEPS:08d}", "step": SMOKE_STEPS}
    assert (run / "data" / "manifest.json").exists()
    for plot in ("loss.png", "reconstruction.png", "stage2-loss.png", "stage2-predictions.png"):
        assert (run / "plots" / plot).read_bytes().startswith(b"\x89PNG"), plot


def test_stage2_has_its_own_checkpoints_and_names_the_tokenizer_it_learned_from(smoke_baseline):
    stage2 = smoke_baseline / "stage2"
    latest = json.loads((stage2 / "checkpoints" / "latest.json").read_text())
    assert latest == {"checkpoint": f"step-{STAGE2_STEPS:08d}", "step": STAGE2_STEPS}
    metrics = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, SMOKE.stage2.epochs + 1))
    assert all({"train_loss", "val_loss", "val_accuracy"} <= set(m) and m["samples_complete"] for m in metrics)
    state = checkpoint_state(stage2 / "checkpoints" / latest["checkpoint"])
    tokenizer = state["tokenizer"]
    stage1 = checkpoint_state(smoke_baseline / "checkpoints" / f"step-{SMOKE_STEPS:08d}")
    assert tokenizer["checkpoint"] == stage1["best"]["checkpoint"]  # the best tokenizer by val loss
    weights = smoke_baseline / "checkpoints" / tokenizer["checkpoint"] / "model.safetensors"
    assert tokenizer["sha256"] == sha256(weights)


def test_checkpoint_manifest_lists_every_file_with_its_hash(smoke_baseline):
    for name in committed_checkpoints(smoke_baseline):
        folder = smoke_baseline / "checkpoints" / name
        manifest = json.loads((folder / "manifest.json").read_text())
        files = {p.name for p in folder.iterdir()} - {"manifest.json"}
        assert set(manifest["files"]) == files == {"model.safetensors", "state.safetensors"}
        for filename, entry in manifest["files"].items():
            assert sha256(folder / filename) == entry["sha256"]
            assert (folder / filename).stat().st_size == entry["size"]
        assert manifest["step"] == int(name.removeprefix("step-"))
        assert {"epoch", "created_at"} <= set(manifest)
        # the manifest is written last: nothing in the folder is newer than it
        assert all(
            (folder / f).stat().st_mtime_ns <= (folder / "manifest.json").stat().st_mtime_ns for f in files
        )


def test_keeps_last_k_and_the_best(smoke_baseline):
    kept = committed_checkpoints(smoke_baseline)
    state = checkpoint_state(smoke_baseline / "checkpoints" / kept[-1])
    best = state["best"]["checkpoint"]
    every = [f"step-{s:08d}" for s in range(SMOKE.checkpoint.every_steps, SMOKE_STEPS + 1, SMOKE.checkpoint.every_steps)]
    expected_last = sorted(set(kept) - {best})[-SMOKE.checkpoint.keep_last :]
    assert set(kept) == set(expected_last) | {best}
    assert kept[-1] == f"step-{SMOKE_STEPS:08d}"  # the final one
    assert len(kept) <= SMOKE.checkpoint.keep_last + 1 < len(every)
    assert not list((smoke_baseline / "checkpoints").glob("**/*.tmp"))


def test_a_rerun_of_a_completed_run_changes_nothing(smoke_baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_baseline, run)
    before = sha256(final_model(run))
    result = run_job("train", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 0, result.stderr
    assert "train.already_complete" in result.stdout
    assert sha256(final_model(run)) == before
    assert json.loads((run / "progress.json").read_text())["attempt"] == 2


def damage_newest(run: Path, how: str) -> tuple[str, str]:
    """Damage the newest checkpoint's weights; return (damaged, previous) names."""
    names = committed_checkpoints(run)
    weights = run / "checkpoints" / names[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    return names[-1], names[-2]


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(smoke_baseline, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(smoke_baseline, run)
    damaged, previous = damage_newest(run, how)
    result = run_job("train", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 0, result.stderr
    events = log_events(result.stdout)
    skipped = [e for e in events if e["event"] == "checkpoint.skipped"]
    assert skipped and skipped[0]["checkpoint"] == damaged and skipped[0]["level"] == "warning"
    resumed = [e for e in events if e["event"] == "train.resumed"]
    assert resumed and resumed[0]["checkpoint"] == previous
    # training redid the steps after `previous` and wrote a sound final checkpoint in place
    assert sha256(final_model(run)) == sha256(final_model(smoke_baseline))


def test_a_resume_that_changes_the_math_is_refused(smoke_baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_baseline, run)
    before = sha256(final_model(run))
    result = run_job(
        "train", "--preset", "smoke", "--run-uri", str(run),
        "--set", "model.channels=4", "--set", "data.seed=9", "--set", "optim.lr=0.1", "--set", "train.epochs=5",
    )
    assert result.returncode == 2
    named = re.search(r"trained with different (.*?);", result.stderr).group(1).split(", ")
    assert named == ["data.seed", "model.channels", "optim.lr"]  # not train.epochs: extending is allowed
    assert sha256(final_model(run)) == before


def progress_while_starting(run: Path, proc: JobProcess, attempt: int) -> list[dict]:
    """Each content of progress.json that attempt ``attempt`` wrote while it said "starting",
    read every few milliseconds until it says something else."""
    seen: list[dict] = []
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            progress = json.loads((run / "progress.json").read_text())
        except (OSError, ValueError):  # between a write and its rename
            continue
        if progress.get("attempt") == attempt:
            if progress["status"] != "starting":
                break
            if progress not in seen:
                seen.append(progress)
        time.sleep(0.005)
    return seen


def test_raising_stage2_epochs_continues_stage2(smoke_baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_baseline, run)
    epochs = SMOKE.stage2.epochs + 1
    proc = JobProcess.job("train", "--preset", "smoke", "--run-uri", str(run), "--set", f"stage2.epochs={epochs}")
    # From its first write on, the restart's progress names the stage it resumes into.
    starting = progress_while_starting(run, proc, attempt=2)
    assert starting, "no progress.json said starting"
    assert all((p["stage"], p["step"], p["epoch"], p["epochs"]) == (2, STAGE2_STEPS, epochs, epochs)
               for p in starting), [(p["stage"], p["step"], p["epoch"], p["epochs"]) for p in starting]
    assert proc.wait(timeout=240) == 0, proc.output[-3000:]
    resumed = proc.events("train.resumed")
    assert [(e["stage"], e["step"]) for e in resumed] == [(1, SMOKE_STEPS), (2, STAGE2_STEPS)]
    metrics = [json.loads(line)["epoch"] for line in (run / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, epochs + 1))
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "completed" and progress["step"] == STAGE2_STEPS // SMOKE.stage2.epochs * epochs


def test_raising_tokenizer_epochs_continues_the_tokenizer_when_stage2_has_not_started(tmp_path):
    run = tmp_path / "run"
    assert run_job("train", "--preset", "smoke", "--run-uri", str(run), "--set", "stage2.epochs=0").returncode == 0
    epochs = SMOKE.train.epochs + 1
    result = run_job("train", "--preset", "smoke", "--run-uri", str(run), "--set", f"train.epochs={epochs}",
                     "--set", "stage2.epochs=0")
    assert result.returncode == 0, result.stderr
    resumed = [e for e in log_events(result.stdout) if e["event"] == "train.resumed"]
    assert resumed and resumed[0]["step"] == SMOKE_STEPS
    metrics = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, epochs + 1))
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "completed" and progress["step"] == SMOKE_STEPS // SMOKE.train.epochs * epochs
    assert not (run / "stage2").exists()


def test_raising_tokenizer_epochs_after_stage2_started_is_refused_before_any_work(smoke_baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_baseline, run)
    before = sha256(final_model(run))
    result = run_job("train", "--preset", "smoke", "--run-uri", str(run), "--set", f"train.epochs={SMOKE.train.epochs + 1}")
    assert result.returncode == 2
    assert "learned from the tokenizer of a 4-epoch run" in result.stderr and "stage2/checkpoints" in result.stderr
    assert "train.progress" not in result.stdout
    assert sha256(final_model(run)) == before


def test_stage2_refuses_to_resume_over_another_tokenizer(smoke_baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_baseline, run)
    latest = json.loads((run / "stage2" / "checkpoints" / "latest.json").read_text())["checkpoint"]
    folder = run / "stage2" / "checkpoints" / latest
    state = checkpoint_state(folder)
    state["tokenizer"]["sha256"] = "0" * 64  # learned from other weights than the run's tokenizer
    rewrite_state(folder, state)
    result = run_job("train", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 2
    assert "refusing to resume stage 2" in result.stderr and "0" * 64 in result.stderr


def test_heartbeat_and_checkpoints_by_minutes(tmp_path):
    run = tmp_path / "run"
    result = run_job(
        "train", "--preset", "smoke", "--run-uri", str(run), "--set", "monitor.heartbeat_seconds=0.2",
        "--set", "checkpoint.every_minutes=0.003", "--set", "checkpoint.every_steps=0", "--set", "checkpoint.every_epochs=0",
    )
    assert result.returncode == 0, result.stderr
    events = log_events(result.stdout)
    beats = [e for e in events if e["event"] == "heartbeat"]
    assert len(beats) >= 2 and all(e["logger"] == "job.heartbeat" and "step" in e for e in beats)
    reasons = {e["reason"] for e in events if e["event"] == "checkpoint.saved"}
    assert reasons == {"minutes", "final"}


def test_a_corrupt_dataset_shard_stops_with_exit_3(tmp_path):
    run = tmp_path / "run"
    assert run_job("generate", "--preset", "smoke", "--run-uri", str(run)).returncode == 0
    shard = run / "data" / "shard-00001.videos.npy"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_job("train", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 3
    assert "shard-00001.videos.npy" in result.stderr
