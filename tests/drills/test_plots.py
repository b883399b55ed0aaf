"""Background plots (SPEC §4 `plots/`): drawing happens in a worker process that gets only the CPU
time training leaves, is replaced when killed, and logs a failed plot and draws the next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import structlog.testing

from job.plots.background import BackgroundPlots
from job.plots.charts import loss_curves_png
from tests.helpers import run_job
from tests.pictures import blob_videos, decoded, epoch_record

# The worker draws at idle priority: beside another test process it may not get a core in time.
pytestmark = [pytest.mark.timeout(60), pytest.mark.serial]


# --- the plot worker: drawing happens in another process ----------------------------------


class Written:
    """What BackgroundPlots stored, with the worker pid at the moment of each write."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.pids: list[int | None] = []
        self.plots = None
        self.event = threading.Event()

    def __call__(self, rel: str, data: bytes) -> None:
        self.files[rel] = data
        self.pids.append(self.plots.worker_pid)
        self.event.set()

    def wait(self) -> None:
        assert self.event.wait(30), "no plot was written"
        self.event.clear()


@pytest.fixture
def written():
    target = Written()
    target.plots = BackgroundPlots(target)
    yield target
    target.plots.close(timeout=10)


def test_background_plots_are_drawn_in_a_worker_process(written):
    written.plots.submit("plots/loss.png", "loss_curves", metrics=[epoch_record(e) for e in range(1, 4)])
    written.plots.submit(
        "plots/reconstruction.png", "reconstruction_grid", originals=blob_videos(2),
        reconstructions=0.5 * blob_videos(2), labels=["a", "b"], title="t",
    )
    written.plots.close(timeout=30)
    assert set(written.files) == {"plots/loss.png", "plots/reconstruction.png"}
    for png in written.files.values():
        decoded(png)
    assert written.files["plots/loss.png"] == loss_curves_png([epoch_record(e) for e in range(1, 4)])
    assert all(pid is not None and pid != os.getpid() for pid in written.pids)


def test_the_plot_worker_only_gets_cpu_time_that_training_leaves(written):
    written.plots.submit("plots/loss.png", "loss_curves", metrics=[epoch_record(1)])
    written.wait()
    pid = written.plots.worker_pid
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE or os.getpriority(os.PRIO_PROCESS, pid) == 19
    assert os.sched_getscheduler(os.getpid()) == os.SCHED_OTHER  # the requester keeps its own priority


def test_a_killed_plot_worker_is_replaced(written):
    written.plots.submit("plots/loss.png", "loss_curves", metrics=[epoch_record(1)])
    written.wait()
    first = written.pids[-1]
    os.kill(first, signal.SIGKILL)
    written.plots.submit("plots/loss.png", "loss_curves", metrics=[epoch_record(1)])
    written.wait()
    assert written.pids[-1] not in (None, first)


def test_a_failed_plot_is_logged_and_the_next_one_drawn(written):
    with structlog.testing.capture_logs() as logs:
        written.plots.submit(
            "plots/reconstruction.png", "reconstruction_grid", originals=blob_videos(2),
            reconstructions=blob_videos(1), labels=["a", "b"], title="t",
        )
        written.plots.submit("plots/loss.png", "loss_curves", metrics=[epoch_record(1)])
        written.plots.close(timeout=30)
    assert list(written.files) == ["plots/loss.png"]
    failures = [e for e in logs if e["event"] == "plot.failed"]
    assert len(failures) == 1 and "ValueError" in failures[0]["error"]


@pytest.mark.timeout(300)
def test_a_one_epoch_run_on_a_loaded_cpu_ends_with_its_pictures_and_its_page(tmp_path):
    """The idle-time plot worker may never get a core on a busy machine: at the end of the run a
    worker at normal priority draws what is left, rather than the pictures being dropped."""
    run = tmp_path / "run"
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        result = run_job("train", "--preset", "smoke", "--run-uri", str(run), "--set", "train.epochs=1",
                         "--set", "stage2.epochs=0", timeout=240)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert result.returncode == 0, result.stdout[-3000:]
    assert '"plot.failed"' not in result.stdout
    for rel in ("plots/loss.png", "plots/reconstruction.png"):
        decoded((run / rel).read_bytes())
    page = (run / "index.html").read_text()
    assert "completed · stage 1/1" in page and page.count('data-series="val_loss" data-epoch="1"') == 1
    assert 'alt="stage 1, newest picture" src="data:image/png;base64,' in page  # the last picture is on the page
