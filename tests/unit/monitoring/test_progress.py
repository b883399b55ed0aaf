"""Progress (job.monitoring.progress): the heartbeat driven by a fake clock, progress files, and
progress rendered for a person."""

from __future__ import annotations

import pytest

from job.monitoring.progress import Heartbeat, render_progress
from job.storage import Layout
from tests.helpers import read_progress

pytestmark = pytest.mark.timeout(30)


def test_a_heartbeat_refreshes_progress_and_survives_a_failing_upload(progress):
    beats = []

    def on_beat():
        beats.append(True)
        raise OSError("upload failed")

    before = read_progress(progress)["heartbeat_at"] if (progress.store.root / Layout.progress).exists() else None
    heartbeat = Heartbeat(progress, interval=30, on_beat=on_beat)
    heartbeat.tick()
    heartbeat.tick()  # the first failure did not end anything
    assert len(beats) == 2
    state = read_progress(progress)
    assert state["heartbeat_at"] and state["heartbeat_at"] != before
    assert "status:" in (progress.store.root / Layout.progress_text).read_text()


def test_a_committed_checkpoint_is_written_with_the_next_heartbeat_not_on_its_own(progress):
    progress.update(step=10)
    progress.remember(last_checkpoint="step-00000010")
    assert read_progress(progress)["last_checkpoint"] is None
    Heartbeat(progress, interval=30).tick()
    assert read_progress(progress)["last_checkpoint"] == "step-00000010"
    assert "last checkpoint: step-00000010" in (progress.store.root / Layout.progress_text).read_text()


def test_progress_renders_for_a_person():
    text = render_progress({"status": "running", "mode": "train", "attempt": 2, "epoch": 3, "epochs": 4,
                            "step": 50, "total_steps": 100, "loss": 0.5, "samples_per_second": 12.0,
                            "eta_seconds": 65, "error": "boom"})
    assert "50/100 (50.0%)" in text and "1m05s" in text and "error:           boom" in text
