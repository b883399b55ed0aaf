"""TensorBoard event files of a stage (docs/run-page.md): under ``tensorboard/<stage>/``, one file
per attempt, each epoch written exactly once across kills and resumes.

An epoch's scalars are written when a checkpoint that has finished it is committed: a resumed
attempt restarts from a committed checkpoint, so it never trains (and writes) such an epoch
again, and an epoch trained but lost to a kill was never written. A kill between a commit and
its events leaves them to the next attempt, which finds them missing from the files. The epoch's picture (drawn by
the plot worker) is written when both it and the commit have arrived, whichever comes last.
Writing happens on the checkpoint writer's and the plot thread's time, never the training step's.

tensorboardX writes the files (a small pure-Python writer of TensorBoard's own protobuf
format; TensorBoard itself, with its server, is only needed to look at them).
"""

from __future__ import annotations

import struct
import threading
import time
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import structlog
from tensorboardX import FileWriter
from google.protobuf.message import DecodeError
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary

from job.storage import RunStore
from job.storage.layout import StageLayout

log = structlog.get_logger("job.tensorboard")

# metrics.jsonl fields that are not measurements of the epoch.
EPOCH_TAG = "train_loss"  # every epoch's record has it: its presence marks the epoch as written
NOT_SCALARS = frozenset({"epoch", "step", "samples", "samples_complete", "attempt", "time"})


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record worth a chart, with samples/s derived."""
    values = {
        key: float(value) for key, value in record.items()
        if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    seconds, samples = record.get("seconds"), record.get("samples")
    if isinstance(seconds, (int, float)) and seconds > 0 and isinstance(samples, int):
        values["samples_per_second"] = samples / seconds
    return values


def wall_time(record: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(record["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return time.time()


class TensorBoardLog:
    """One stage's events of one attempt. ``committed`` and ``picture`` may come from any thread."""

    def __init__(self, store: RunStore, layout: StageLayout, attempt: int, history: list[dict[str, Any]]):
        """``history``: the epochs the checkpoint this attempt resumed from has finished. Earlier
        attempts' files hold them, except one whose events a kill cut off between its commit and
        their writing: that one is written now, from the history (the same numbers)."""
        self.store, self.folder = store, layout.tensorboard
        self.picture_tag = PurePosixPath(layout.picture_plot).stem  # "reconstruction", "stage2-predictions"
        self.suffix = f".attempt-{attempt:03d}"
        self.written = len(history)  # epochs whose scalars are in some attempt's file
        self.first = len(history) + 1  # the first epoch this attempt trains
        self._pictures: dict[int, tuple[int, bytes]] = {}  # epoch -> (step, png), waiting for its commit
        self._lock = threading.Lock()
        self._writer: FileWriter | None = None
        self._closed = False
        if history:
            recorded = self._recorded_steps()
            self._write_scalars([r for r in history if r.get("step") not in recorded])

    def committed(self, epochs: int, metrics: list[dict[str, Any]]) -> None:
        """A checkpoint that has finished ``epochs`` epochs is committed; ``metrics`` is the
        stage's history (at least that long)."""
        with self._lock:
            if self._closed:
                return
            if epochs <= self.written:
                return
            self._write_scalars(metrics[self.written : epochs], deliver=False)
            self.written = epochs
            for epoch in sorted(e for e in self._pictures if e <= self.written):
                self._add_picture(epoch, *self._pictures.pop(epoch))
            self._deliver()

    def picture(self, epoch: int, step: int, png: bytes) -> None:
        """The stage's picture (a PNG) at the end of ``epoch``."""
        with self._lock:
            if epoch < self.first or self._closed:  # not this attempt's, or drawn too late
                return
            if epoch > self.written:
                self._pictures[epoch] = (step, png)  # its commit has not come yet
                return
            self._add_picture(epoch, step, png)
            self._deliver()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _write_scalars(self, records: list[dict[str, Any]], deliver: bool = True) -> None:
        records = [r for r in records if isinstance(r.get("epoch"), int) and isinstance(r.get("step"), int)]
        for record in records:
            for tag, value in scalars(record).items():
                self._add(Summary.Value(tag=tag, simple_value=value), record["step"], wall_time(record))
        if records and deliver:
            self._deliver()

    def _recorded_steps(self) -> set[int]:
        """The steps whose epoch the stage's event files (earlier attempts') already hold."""
        steps: set[int] = set()
        for name in self.store.list_dir(self.folder):
            data = self.store.read_bytes(f"{self.folder}/{name}") if "tfevents" in name else None
            steps |= {e.step for e in events_of(data or b"") if any(v.tag == EPOCH_TAG for v in e.summary.value)}
        return steps

    def _add_picture(self, epoch: int, step: int, png: bytes) -> None:
        height, width = png_size(png)
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        self._add(Summary.Value(tag=self.picture_tag, image=image), step, time.time())

    def _add(self, value: Summary.Value, step: int, walltime: float) -> None:
        if self._writer is None:
            self._writer = FileWriter(str(self.store.local_path(self.folder)), filename_suffix=self.suffix)
        self._writer.add_summary(Summary(value=[value]), global_step=step, walltime=walltime)

    def _deliver(self) -> None:
        """Onto the disk, then to the run URI as the bytes are now, in the checkpoints' lane: the
        bucket never holds an epoch whose checkpoint has not arrived there first, so a new
        container, which resumes from the bucket's newest checkpoint, never writes it again."""
        self._writer.flush()
        for name in self.store.local.list_dir(self.folder):
            if name.endswith(self.suffix):
                rel = f"{self.folder}/{name}"
                self.store.publish(rel, self.store.local.read_bytes(rel))


def events_of(data: bytes) -> list[Event]:
    """The events of an event file (TFRecords: length, its CRC, the record, its CRC); a record
    cut off by a kill ends the list. Only protobuf parses them: nothing that runs code."""
    found, position = [], 0
    while position + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, position)
        start, end = position + 12, position + 12 + length
        if end + 4 > len(data):
            break
        try:
            found.append(Event.FromString(data[start:end]))
        except DecodeError:
            break
        position = end + 4
    return found


def png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's header (IHDR): the image proto wants them."""
    return int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big")
