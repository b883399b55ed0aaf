"""What a run folder says, read through anything that has ``read_bytes``, ``list_dir`` and
``file_sizes`` (a local or remote folder, status's retrying reader, the job's run store): its
progress, its metrics by epoch, each stage's newest committed checkpoint and what verify said.
Shared by ``status`` and the run page (``job.monitoring.page``). Imports no torch or numpy.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any, Protocol

from job.storage import Layout
from job.storage.layout import StageLayout, is_plain_file_name

DEFAULT_HEARTBEAT_SECONDS = 30.0
LIVE_STATUSES = ("starting", "running")  # a run that says one of these should be beating
STALE_AFTER_BEATS = 3  # a running run whose heartbeat is older than this many intervals is stale


class Readable(Protocol):
    def read_bytes(self, rel: str) -> bytes | None: ...
    def list_dir(self, rel: str) -> list[str]: ...
    def file_sizes(self, rel: str) -> dict[str, int]: ...


class FolderReader:
    """Read-only access to a run folder, with JSON files parsed and their problems noted."""

    def __init__(self, folder: Readable):
        self.folder = folder

    def read_bytes(self, rel: str) -> bytes | None:
        return self.folder.read_bytes(rel)

    def list_dir(self, rel: str) -> list[str]:
        return self.folder.list_dir(rel)

    def file_sizes(self, rel: str) -> dict[str, int]:
        """Name -> size of the files directly in folder ``rel``, from one listing."""
        return self.folder.file_sizes(rel)

    def read_json(self, rel: str, notes: list[str]) -> Any | None:
        """The parsed file, or None when it is missing or not JSON (then ``notes`` says so)."""
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            notes.append(f"{rel} is not valid JSON ({exc})")
            return None


def parse_progress(data: bytes | None) -> tuple[dict[str, Any] | None, str | None]:
    """The progress fields, or None and what is wrong with the file."""
    if data is None:
        return None, f"no {Layout.progress} (the run has checkpoints but has not reported progress)"
    try:
        progress = json.loads(data)
    except ValueError as exc:
        return None, f"{Layout.progress} is not valid JSON ({exc}); a partial or corrupt write?"
    if not isinstance(progress, dict):
        return None, f"{Layout.progress} holds a {type(progress).__name__}, not an object"
    return progress, None


def heartbeat_interval(config: Any) -> float:
    try:
        seconds = float(config["monitor"]["heartbeat_seconds"])
    except (TypeError, KeyError, ValueError):
        return DEFAULT_HEARTBEAT_SECONDS
    return seconds if seconds > 0 else DEFAULT_HEARTBEAT_SECONDS


def age_seconds(timestamp: Any, now: datetime) -> float | None:
    if not isinstance(timestamp, str):
        return None
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if moment.tzinfo is None:  # the job writes UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return (now - moment).total_seconds()


def newest_committed_checkpoint(
    run: FolderReader, stage: StageLayout, names: list[str], notes: list[str]
) -> dict[str, Any] | None:
    """The stage's newest checkpoint whose manifest exists and whose listed files all exist with
    the manifest's sizes; each newer one that falls short is named in ``notes``."""
    latest_file = PurePosixPath(stage.latest).name
    for name in sorted((n for n in names if n != latest_file), reverse=True):
        manifest = run.read_json(stage.checkpoint_manifest(name), notes)
        problem = commit_problem(manifest, run.file_sizes(stage.checkpoint_dir(name)) if manifest else {})
        if problem is None:
            return {
                "name": name,
                "folder": stage.checkpoint_dir(name),
                "step": manifest.get("step"),
                "epoch": manifest.get("epoch"),
                "created_at": manifest.get("created_at"),
                "committed": True,
                "sizes_match": True,
                "verify": verify_result(run.read_json(Layout.verify_report, notes), stage.label + name),
            }
        notes.append(f"skipped checkpoint {name}: {problem}")
    return None


def commit_problem(manifest: Any, sizes: dict[str, int]) -> str | None:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return f"no readable {Layout.checkpoint_manifest_file} (not committed)"
    foreign = [name for name in manifest["files"] if not is_plain_file_name(name)]
    if foreign:  # what every reader refuses (job.checkpoints.reader): the checkpoint is invalid
        return f"its manifest names {foreign[0]!r}, not a plain file of its folder"
    for filename, entry in sorted(manifest["files"].items()):
        expected = entry.get("size") if isinstance(entry, dict) else None
        if filename not in sizes:
            return f"{filename} is missing"
        if sizes[filename] != expected:
            return f"{filename} has {sizes[filename]} bytes, its manifest says {expected}"
    return None


def verify_result(report: Any, checkpoint: str) -> dict[str, Any] | None:
    """What verify/report.json says, and whether it covers ``checkpoint``: a report written
    before that checkpoint existed vouches only for older ones."""
    if not isinstance(report, dict) or not isinstance(report.get("passed"), bool):
        return None
    checks = [c for c in report.get("checks") or [] if isinstance(c, dict)]
    return {
        "passed": report["passed"],
        "covers_checkpoint": checkpoint in {str(c.get("name", "")).split(" ", 1)[-1] for c in checks},
        "failed_checks": [str(c.get("name")) for c in checks if c.get("passed") is False],
    }


def epoch_records(metrics: bytes, notes: list[str], rel: str = Layout.metrics) -> dict[int, dict[str, Any]]:
    """metrics.jsonl by epoch; a resume that repeated an epoch counts with its last record."""
    records: dict[int, dict[str, Any]] = {}
    unreadable = 0
    for line in metrics.decode(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records[record["epoch"]] = record
    if unreadable:
        notes.append(f"{unreadable} line(s) of {rel} are not valid JSON")
    return records


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
