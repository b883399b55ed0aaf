"""Where the tokenizer spends its codes: object cells, far background, the black video."""

from __future__ import annotations

import torch

from job.config import build_config
from job.eval.tokens import code_statistics, near_cells
from job.models.tokenizer import initial_tokenizer


def test_near_cells_reach_two_cells_in_time_and_space():
    cells = torch.zeros(1, 6, 6, 6, dtype=torch.bool)
    cells[0, 0, 0, 0] = True
    near = near_cells(cells, 2)
    assert near[0, :3, :3, :3].all() and int(near.sum()) == 27


def test_code_statistics_separate_object_and_far_background():
    objects = torch.zeros(2, 4, 8, 8, dtype=torch.bool)
    objects[:, :, 0, 0] = True
    codes = torch.zeros(2, 4, 8, 8, dtype=torch.long)
    codes[:, :, 0, 0] = torch.arange(8).view(2, 4)  # eight object codes, once each
    codes[:, :, 1, 1] = 5  # near background: counted in neither group
    stats = code_statistics(codes, objects, 16)
    assert stats["object"]["tokens"] == 8 and abs(stats["object"]["perplexity"] - 8) < 1e-9
    assert stats["far_background"]["perplexity"] == 1.0  # one code on every far cell
    assert stats["far_background"]["tokens"] == 2 * 4 * (64 - 9)


def test_object_cells_follow_the_tokenizer_grid():
    cfg = build_config("smoke")
    model = initial_tokenizer(cfg)
    video = torch.zeros(1, 1, *model.input_shape)
    video[0, 0, 1, 5, 9] = 1.0
    cells = model.object_cells(video, cfg.model.foreground_threshold)
    t, h, w = model.latent_shape()
    frames, height, width = model.input_shape
    assert cells.shape == (1, t, h, w) and int(cells.sum()) == 1
    assert cells[0, 1 * t // frames, 5 * h // height, 9 * w // width]
