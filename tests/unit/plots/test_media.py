"""Stage 2's media (job.plots.media): a GIF has one frame per video frame."""

from __future__ import annotations

import io

import numpy as np
import pytest

from job.plots.media import animated_gif, strip_png

pytestmark = pytest.mark.timeout(600)


# --- the files ---------------------------------------------------------------------------------


def test_gif_has_one_frame_per_video_frame_even_when_frames_repeat():
    from PIL import Image

    frames = np.zeros((5, 8, 8), dtype=np.float32)  # all black: Pillow would merge identical frames
    gif = Image.open(io.BytesIO(animated_gif(frames)))
    assert gif.n_frames == 5
    png = Image.open(io.BytesIO(strip_png(frames)))
    assert png.format == "PNG" and png.size[0] > 5 * png.size[1]
