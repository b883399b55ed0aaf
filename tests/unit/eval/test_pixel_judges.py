"""The pixel judges of generated videos: object counts, the track classifier, the Fréchet distance."""

from __future__ import annotations

import torch

from job.config import build_config
from job.data.synthetic import generate_samples
from job.eval.frame_metrics import single_object_share
from job.eval.pixel_judges import (
    PixelJudges,
    frechet_distance,
    track_features,
)

THRESHOLD = 0.05


def real_videos(count: int = 200):
    cfg = build_config("smoke").data
    videos, labels = generate_samples(cfg, 0, count)
    return torch.from_numpy(videos).float() / 255.0, torch.from_numpy(labels).long()


def test_real_videos_show_one_object_and_their_tracks_tell_the_class():
    videos, labels = real_videos()
    assert single_object_share(videos) > 0.95
    judges = PixelJudges.fit(videos[:150], labels[:150], 4, THRESHOLD)
    assert judges.track_accuracy(videos[150:], labels[150:]) > 0.6  # chance is 0.25
    # A video without motion (the first frame repeated) is not recognised by its track.
    still = videos[150:, :1].expand_as(videos[150:])
    assert judges.track_accuracy(still, labels[150:]) < 0.5
    assert track_features(videos[:3], THRESHOLD).shape[0] == 3


def test_frechet_distance_ranks_real_videos_close_and_black_far():
    videos, labels = real_videos(240)
    judges = PixelJudges.fit(videos[:160], labels[:160], 4, THRESHOLD)
    real, other = videos[160:200], videos[200:240]
    floor = judges.frechet(other, real)
    black = judges.frechet(torch.zeros_like(other), real)
    assert 0 <= floor < black
    a = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(a, a)) < 1e-9
    assert abs(frechet_distance(a, a + 1.0) - 6.0) < 1e-6  # a shift of 1 in each of 6 dimensions
