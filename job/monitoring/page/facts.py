"""Everything the run page shows, gathered from the run folder alone: progress, each stage's
metrics, picture and newest committed checkpoint, the attempts from their logs, verify, the
evaluation report, samples and predictions. What is missing or unreadable becomes a note for
the page, never an exception."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from job.monitoring.run_facts import (
    LIVE_STATUSES,
    STALE_AFTER_BEATS,
    FolderReader,
    epoch_records,
    heartbeat_interval,
    newest_committed_checkpoint,
    parse_progress,
)
from job.storage import Layout
from job.storage.layout import StageLayout

# Images are inlined as data: URLs (base64: 4/3 of their bytes). Past this many bytes of images
# the page names the rest instead, so that it stays a file a browser opens at once (< 2 MB).
IMAGE_BUDGET_BYTES = 1_200_000
SAMPLES_PER_CLASS = 2
PREDICTIONS_SHOWN = 8
# Log records worth a line in the attempts table; anything else is skipped without parsing.
ATTEMPT_EVENTS = ('"train.resumed"', '"train.fresh_start"', '"train.completed"', '"level": "error"')


@dataclass
class Image:
    caption: str
    rel: str
    data: bytes | None  # None: not inlined (over the budget)
    kind: str = "png"


@dataclass
class StageFacts:
    number: int
    layout: StageLayout
    epochs: list[dict[str, Any]]
    checkpoint: dict[str, Any] | None
    picture: Image | None


@dataclass
class Attempt:
    number: int
    started_at: str | None = None
    resumed: list[str] = field(default_factory=list)  # per stage: "from step-... " or "fresh"
    end: str = "no end recorded: killed (kill -9, a crash, a lost machine)"
    failed: bool = False
    ended: bool = False  # its log says how it ended


@dataclass
class PageFacts:
    uri: str
    written_at: datetime
    progress: dict[str, Any] | None
    config: dict[str, Any] | None
    stale_after: float
    stages: list[StageFacts]
    attempts: list[Attempt]
    verify: dict[str, Any] | None
    eval_markdown: str | None
    eval_images: dict[str, Image]
    samples: list[Image]
    predictions: list[Image]
    notes: list[str]


class ImageBudget:
    """Hands out image bytes until the page's budget is spent."""

    def __init__(self, run: FolderReader, budget: int = IMAGE_BUDGET_BYTES):
        self.run, self.left = run, budget

    def image(self, caption: str, rel: str, notes: list[str], kind: str = "png") -> Image | None:
        data = self.run.read_bytes(rel)
        if data is None:
            notes.append(f"{rel} is missing")
            return None
        if len(data) > self.left:
            return Image(caption, rel, None, kind)
        self.left -= len(data)
        return Image(caption, rel, data, kind)


def gather(run: FolderReader, uri: str, now: datetime) -> PageFacts:
    notes: list[str] = []
    progress, problem = parse_progress(run.read_bytes(Layout.progress))
    if problem:
        notes.append(problem)
    config = run.read_json(Layout.config, notes)
    if config is not None and not isinstance(config, dict):
        notes.append(f"{Layout.config} holds a {type(config).__name__}, not an object")
        config = None
    images = ImageBudget(run)
    stages = [stage_facts(run, number, layout, images, notes) for number, layout in enumerate(Layout.stages, start=1)]
    verify = run.read_json(Layout.verify_report, notes)
    eval_markdown = run.read_bytes(Layout.eval_markdown)
    markdown_text = eval_markdown.decode(errors="replace") if eval_markdown is not None else None
    return PageFacts(
        uri=uri, written_at=now, progress=progress, config=config,
        stale_after=STALE_AFTER_BEATS * heartbeat_interval(config),
        stages=[s for s in stages if s.epochs or s.checkpoint or s.picture or s.number == 1],
        attempts=settled(attempts(run, notes), progress),
        verify=verify if isinstance(verify, dict) else None,
        eval_markdown=markdown_text,
        eval_images=eval_images(run, markdown_text, images, notes),
        samples=listed_videos(run, Layout.samples, Layout.samples_index, "gif", images, notes),
        predictions=listed_videos(run, Layout.predictions, Layout.predictions_index, "png", images, notes),
        notes=notes,
    )


def stage_facts(run: FolderReader, number: int, layout: StageLayout, images: ImageBudget, notes: list[str]) -> StageFacts:
    metrics = run.read_bytes(layout.metrics)
    records = epoch_records(metrics or b"", notes, layout.metrics)
    names = run.list_dir(layout.checkpoints)
    picture = None
    if layout.picture_plot in {f"{Layout.plots}/{n}" for n in run.list_dir(Layout.plots)}:
        picture = images.image(f"stage {number}, newest picture", layout.picture_plot, notes)
    return StageFacts(
        number=number, layout=layout, epochs=[records[e] for e in sorted(records)],
        checkpoint=newest_committed_checkpoint(run, layout, names, notes) if names else None,
        picture=picture,
    )


def attempts(run: FolderReader, notes: list[str]) -> list[Attempt]:
    found = []
    for name in run.list_dir(Layout.logs):
        number = Layout.attempt_of_log(name)
        data = run.read_bytes(f"{Layout.logs}/{name}") if number is not None else None
        if data is not None:
            found.append(attempt_from_log(number, data.decode(errors="replace"), notes))
    return sorted(found, key=lambda a: a.number)


def attempt_from_log(number: int, text: str, notes: list[str]) -> Attempt:
    attempt = Attempt(number)
    lines = text.splitlines()
    wanted = [line for line in lines[1:] if any(e in line for e in ATTEMPT_EVENTS)]
    for line in lines[:1] + wanted:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut off by a kill: the rest of the log still counts
        if not isinstance(record, dict):
            continue
        attempt.started_at = attempt.started_at or _text(record.get("timestamp"))
        event, stage = record.get("event"), record.get("stage")
        if event == "train.resumed":
            attempt.resumed.append(f"stage {stage}: from {record.get('checkpoint')} (step {record.get('step')})")
        elif event == "train.fresh_start":
            attempt.resumed.append(f"stage {stage}: fresh start")
        elif event == "train.completed":
            attempt.end, attempt.failed, attempt.ended = "completed", False, True
        elif record.get("level") == "error":
            exit_code = record.get("exit_code")
            attempt.end = f"{event}: {record.get('error', '')}" + (f" (exit {exit_code})" if exit_code is not None else "")
            attempt.failed = attempt.ended = True
    return attempt


def settled(found: list[Attempt], progress: dict[str, Any] | None) -> list[Attempt]:
    """The newest attempt's end from progress.json when its log has none yet: it is running, or
    its last words (the exit's log line) come after the page the job writes on its way out."""
    if found and progress and not found[-1].ended and found[-1].number == progress.get("attempt"):
        status = progress.get("status")
        if status in LIVE_STATUSES:
            found[-1].end = f"{status} (progress.json)"
        elif isinstance(status, str):
            error = progress.get("error")
            found[-1].end = f"{status} (progress.json)" + (f": {error}" if error else "")
            found[-1].failed = status != "completed"
    return found


def eval_images(run: FolderReader, markdown: str | None, images: ImageBudget, notes: list[str]) -> dict[str, Image]:
    """The images report.md shows (plain file names beside it in eval/)."""
    found = {}
    for line in (markdown or "").splitlines():
        line = line.strip()
        if line.startswith("![") and line.endswith(")") and "](" in line:
            target = line[line.index("](") + 2 : -1]
            if "/" not in target and target not in found:
                image = images.image(target, f"{Layout.eval}/{target}", notes)
                if image:
                    found[target] = image
    return found


def listed_videos(
    run: FolderReader, folder: str, index_rel: str, kind: str, images: ImageBudget, notes: list[str]
) -> list[Image]:
    """The videos an index (samples/ or predictions/) lists: a few per class, as ``kind`` files."""
    index = run.read_json(index_rel, notes)
    if index is None:
        return []
    videos = index.get("videos") if isinstance(index, dict) else None
    if not isinstance(videos, list):
        notes.append(f"{index_rel} lists no videos")
        return []
    shown, per_class = [], {}
    for video in videos:
        name = video.get(kind) if isinstance(video, dict) else None
        if not isinstance(name, str) or "/" in name:
            continue
        label = _text(video.get("class")) or "?"
        per_class[label] = per_class.get(label, 0) + 1
        limit = SAMPLES_PER_CLASS if kind == "gif" else PREDICTIONS_SHOWN
        if (kind == "gif" and per_class[label] > limit) or (kind != "gif" and len(shown) >= limit):
            continue
        image = images.image(f"{label}: {name}", f"{folder}/{name}", notes, kind)
        if image:
            shown.append(image)
    return shown


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
