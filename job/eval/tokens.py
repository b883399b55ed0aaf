"""What the tokenizer's codes mean: how many codes it spends where the object is, and where the
frame is black far from it. Black should be one code (stage 2 then models the scene, not noise the
decoder ignores); the object's cells need many (where in the cell the object is)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from job.models.tokenizer import VideoTokenizer, codebook_stats

# Background cells at least this many latent cells (in t, h and w) from any object cell are
# "far": nothing the decoder draws there depends on the object.
FAR_CELLS = 2


def near_cells(cells: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, t, h, w) bool: the cells within ``radius`` cells (Chebyshev, in t, h and w) of a True one."""
    kernel = 2 * radius + 1
    return F.max_pool3d(cells[:, None].float(), kernel, stride=1, padding=radius)[:, 0] > 0


def code_statistics(codes: torch.Tensor, objects: torch.Tensor, codebook_size: int) -> dict[str, Any]:
    """Usage and perplexity of the codes of object cells and of far-background cells, from codes
    (N, t, h, w) and the object cells (N, t, h, w) of the same videos."""
    far = ~near_cells(objects, FAR_CELLS)
    return {
        "object": {**codebook_stats(codes[objects], codebook_size), "tokens": int(objects.sum())},
        "far_background": {**codebook_stats(codes[far], codebook_size), "tokens": int(far.sum())},
        "far_cells": FAR_CELLS,
    }


@torch.no_grad()
def black_video_codes(model: VideoTokenizer, device: torch.device) -> int:
    """How many distinct codes an exactly black video encodes to (1 when black means one thing)."""
    black = torch.zeros((1, 1, *model.input_shape), device=device)
    return int(model.encode(black).unique().numel())
