"""What the trained models make: prediction sees only the frames it is given."""

from __future__ import annotations

import numpy as np
import torch

from job.config import build_config
from job.inference.load import VideoModels
from job.inference.videos import given_video_frames, predict_videos, sampling_generator
from job.models.tokenizer import VideoTokenizer
from job.models.transformer import initial_transformer
from tests.blobs import blob_videos


def test_a_prediction_depends_on_the_given_frames_only_not_on_the_ones_it_predicts():
    """Two clips that share their given frames and differ after them must be continued alike:
    the encoder's 3D convolutions (and GroupNorm over the clip) would let the given frames' codes
    see the future the model is scored on. An encoder that sees each frame alone could not leak."""
    cfg = build_config("smoke", None, ["model.encoder_time=centered", "model.norm=group"])
    torch.manual_seed(0)
    tokenizer = VideoTokenizer(cfg.model, cfg.data).eval()
    model = VideoModels(tokenizer, initial_transformer(cfg, tokenizer).eval(), torch.device("cpu"))
    given = given_video_frames(model)
    frames = cfg.data.frames
    assert 0 < given < frames
    path = np.array([[[4.0 + t, 4.0 + t] for t in range(frames)]])
    turned = path.copy()
    turned[:, given:] = [[12.0 - t, 3.0 + t] for t in range(frames - given)]
    videos = torch.cat([blob_videos(path), blob_videos(turned)])[:, None]  # (2, 1, T, H, W)
    assert torch.equal(videos[0, :, :given], videos[1, :, :given]) and not torch.equal(videos[0], videos[1])

    first = predict_videos(model, videos[:1], sampling_generator(0, model.device))
    second = predict_videos(model, videos[1:], sampling_generator(0, model.device))
    assert torch.equal(first, second)
