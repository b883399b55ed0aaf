"""Charts for the run folder (job.plots.charts, SPEC §4 `plots/`): valid, non-blank,
deterministic PNG bytes, drawn from threads without pyplot or torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from job.plots.charts import MAX_FRAMES_PER_ROW, loss_curves_png, reconstruction_grid_png
from tests.helpers import ROOT, job_env
from tests.pictures import blob_videos, decoded, epoch_record

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("epochs", [0, 1, 12])
def test_loss_curves_render_for_any_number_of_epochs(epochs):
    decoded(loss_curves_png([epoch_record(e) for e in range(1, epochs + 1)]))


def test_loss_curves_tolerate_missing_and_unusable_values():
    metrics = [epoch_record(e) for e in range(1, 6)]
    del metrics[0]["val_mse"]
    del metrics[1]["lr"]
    del metrics[2]["epoch"]
    metrics[3]["val_loss"] = None
    metrics[4]["codebook_perplexity"] = float("nan")
    metrics.append({"epoch": 6})  # an old line that recorded nothing else
    metrics.append({"train_loss": -0.1, "val_loss": 0.0})  # a non-positive value cannot go on a log axis
    decoded(loss_curves_png(metrics))


def test_loss_curves_are_deterministic():
    metrics = [epoch_record(e) for e in range(1, 8)]
    assert loss_curves_png(metrics) == loss_curves_png([dict(record) for record in metrics])
    assert loss_curves_png([]) == loss_curves_png([])


def test_reconstruction_grid_is_a_valid_non_blank_png():
    originals = blob_videos(2)
    decoded(reconstruction_grid_png(originals, originals * 0.5, ["line", "circle"], "step 10"))


def test_reconstruction_grid_is_deterministic():
    originals = blob_videos(2)
    reconstructions = np.clip(originals + 0.1, 0, 1)
    first = reconstruction_grid_png(originals, reconstructions, ["a", "b"], "title")
    assert first == reconstruction_grid_png(originals.copy(), reconstructions.copy(), ["a", "b"], "title")


def test_reconstruction_grid_grows_with_the_number_of_samples():
    heights = []
    for n_samples in (1, 2, 4):
        originals = blob_videos(n_samples)
        labels = [f"class{i}" for i in range(n_samples)]
        heights.append(decoded(reconstruction_grid_png(originals, originals, labels, "t")).shape[0])
    assert heights[0] < heights[1] < heights[2]


def test_reconstruction_grid_shows_a_bright_blob():
    dark = np.zeros((1, 6, 16, 16), dtype=np.float32)
    # Same label and title, so that the layouts match and only the pixels differ.
    empty = decoded(reconstruction_grid_png(dark, dark, ["sample"], "t"))
    with_blob = decoded(reconstruction_grid_png(blob_videos(1), dark, ["sample"], "t"))
    assert empty.shape == with_blob.shape
    # The blob brightens the original row and, as a missed blob, the error row.
    assert with_blob[..., :3].mean() > empty[..., :3].mean()
    assert np.abs(with_blob - empty).max() > 0.5


def test_reconstruction_grid_limits_frames_per_row():
    shapes = []
    for frames in (MAX_FRAMES_PER_ROW, 4 * MAX_FRAMES_PER_ROW):
        videos = blob_videos(1, frames=frames)
        shapes.append(decoded(reconstruction_grid_png(videos, videos, ["a"], "t")).shape)
    assert shapes[0] == shapes[1]


def test_reconstruction_grid_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        reconstruction_grid_png(blob_videos(2), blob_videos(1), ["a", "b"], "t")
    with pytest.raises(ValueError):
        reconstruction_grid_png(blob_videos(2), blob_videos(2), ["only one"], "t")


def test_renders_from_threads_without_pyplot_or_torch():
    code = (
        "import sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from job.plots.charts import loss_curves_png\n"
        "metrics = [{'epoch': e, 'train_loss': 1 / e} for e in range(1, 6)]\n"
        "with ThreadPoolExecutor(4) as pool:\n"
        "    images = list(pool.map(loss_curves_png, [metrics] * 8))\n"
        "assert len(set(images)) == 1\n"
        "assert 'torch' not in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=job_env(), check=True, timeout=50)


# --- drawing happens outside the training process ------------------------------------------


def test_the_training_process_never_imports_matplotlib():
    code = "import sys, job.training.loop\nassert 'matplotlib' not in sys.modules, 'matplotlib imported by job.training.loop'\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=job_env(), check=True, timeout=50)
