"""Stage 2's generation metrics (job.eval.generation) on crafted videos."""

from __future__ import annotations

import numpy as np
import pytest

from job.eval.generation import diversity, presence, second_difference
from tests.blobs import blob_videos, linear_blobs

pytestmark = pytest.mark.timeout(600)
THRESHOLD = 0.05


# --- generation metrics --------------------------------------------------------------------------


def test_generation_metrics_on_crafted_videos():
    videos = linear_blobs()
    assert presence(videos) == 1.0
    dim = videos.clone()
    dim[:, ::2] *= 50 / 255  # every other frame's brightest pixel is 50 < VISIBLE_PIXEL
    assert presence(dim) == pytest.approx(0.5)
    assert second_difference(videos, THRESHOLD) == pytest.approx(0.0, abs=1e-4)
    bent = blob_videos(np.array([[[4, 4], [5, 5], [6, 6], [6, 8], [6, 10], [6, 12]]], dtype=float))
    assert second_difference(bent, THRESHOLD) == pytest.approx(2**0.5 / 4, abs=1e-3)  # one bend of |(-1, 1)| in 4
    assert diversity(videos[:1].repeat(3, 1, 1, 1)) == 0.0
    assert diversity(videos) > 0.0
