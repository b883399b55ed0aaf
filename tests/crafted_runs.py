"""Run folders crafted file by file, with timestamps we control, for the tests of `status` (in
process in tests/unit/modes/, as a process in tests/drills/)."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from job.cli import main


def ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(timespec="seconds")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_files(step: int, epoch: int) -> dict[str, bytes]:
    """A committed checkpoint: its files, then a manifest with their sizes and hashes."""
    folder = f"checkpoints/{checkpoint_name(step)}"
    files = {"model.safetensors": os.urandom(1000 + step), "state.json": json.dumps({"step": step}).encode()}
    manifest = {
        "files": {name: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for name, d in files.items()},
        "step": step, "epoch": epoch, "created_at": ago(60), "format": 1,
    }
    return {f"{folder}/{name}": data for name, data in files.items()} | {
        f"{folder}/manifest.json": json.dumps(manifest).encode()
    }


def crafted_run(
    status: str = "running", heartbeat_age: float = 2.0, heartbeat_seconds: float | None = 30.0,
    val_losses: tuple[float, ...] = (0.3, 0.2, 0.1), **progress_fields,
) -> dict[str, bytes]:
    """The files of a run folder with one checkpoint and one metrics line per epoch."""
    steps = [10 * epoch for epoch in range(1, len(val_losses) + 1)]
    progress = {
        "status": status, "mode": "train", "epoch": len(val_losses), "epochs": 10, "step": steps[-1],
        "total_steps": 100, "loss": 0.5, "samples_per_second": 12.5, "eta_seconds": 600,
        "started_at": ago(3600), "updated_at": ago(heartbeat_age), "heartbeat_at": ago(heartbeat_age),
        "attempt": 1, "last_checkpoint": checkpoint_name(steps[-1]), **progress_fields,
    }
    metrics = [
        {"epoch": epoch, "step": step, "train_loss": val + 0.05, "val_loss": val}
        for epoch, (step, val) in enumerate(zip(steps, val_losses), start=1)
    ]
    files = {
        "progress.json": json.dumps(progress).encode(),
        "metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics).encode(),
        "checkpoints/latest.json": json.dumps({"checkpoint": checkpoint_name(steps[-1]), "step": steps[-1]}).encode(),
    }
    if heartbeat_seconds is not None:
        files["config.json"] = json.dumps({"monitor": {"heartbeat_seconds": heartbeat_seconds}}).encode()
    for epoch, step in enumerate(steps, start=1):
        files |= checkpoint_files(step, epoch)
    return files


def write_run(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def status(capsys, *args: str) -> tuple[int, str]:
    """``python -m job status ARGS`` in this process (fast); returns exit code and stdout."""
    code = main(["status", *args])
    return code, capsys.readouterr().out


def damage(files: dict[str, bytes], how: str) -> dict[str, bytes]:
    """The newest checkpoint (step 30) made uncommitted in one of the ways a crash or a
    half-finished upload leaves it."""
    folder = "checkpoints/step-00000030"
    if how == "missing file":
        return {rel: data for rel, data in files.items() if rel != f"{folder}/model.safetensors"}
    if how == "wrong size":
        return files | {f"{folder}/model.safetensors": b"truncated"}
    if how == "names a file outside":
        manifest = json.loads(files[f"{folder}/manifest.json"])
        manifest["files"]["../step-00000020/model.safetensors"] = manifest["files"]["model.safetensors"]
        return files | {f"{folder}/manifest.json": json.dumps(manifest).encode()}
    return {rel: data for rel, data in files.items() if rel != f"{folder}/manifest.json"}
