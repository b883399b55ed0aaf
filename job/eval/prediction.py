"""How good predicted frames are (docs/generation.md): the model and two baselines made from the
TRUE given frames, each scored against the truth by ``job.eval.frame_metrics.score_frames``.

``baseline_copy_last`` repeats the last given frame; ``baseline_constant_velocity`` moves it along
the velocity of the last two given frames' centroids, k frames ahead by k times that velocity,
with a bilinear sub-pixel shift (grid_sample, black coming in at the edges); no velocity (0)
where either centroid is missing.
"""

from __future__ import annotations

from typing import Any

import structlog
import torch
import torch.nn.functional as F

from job.eval.frame_metrics import CONSTANT_VELOCITY, COPY_LAST, MODEL, FrameScores, centroids, score_frames, summarise

log = structlog.get_logger("job.evaluate")

PREDICTION_KINDS = (MODEL, COPY_LAST, CONSTANT_VELOCITY)


# --- prediction: baselines and scores --------------------------------------------------------------


def shift_frames(frames: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Frames (N, H, W) moved by ``offsets`` (N, 2) = (rows, cols) pixels, sub-pixel by bilinear
    interpolation; what comes in from outside the frame is black."""
    n, height, width = frames.shape
    theta = torch.zeros(n, 2, 3, dtype=torch.float32, device=frames.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # affine_grid maps output to input coordinates (x = column, y = row), normalised to [-1, 1]:
    # the content moves by +d when the output samples the input at -d.
    theta[:, 0, 2] = -2.0 * offsets[:, 1].float() / max(width - 1, 1)
    theta[:, 1, 2] = -2.0 * offsets[:, 0].float() / max(height - 1, 1)
    grid = F.affine_grid(theta, (n, 1, height, width), align_corners=True)
    moved = F.grid_sample(frames[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return moved[:, 0]


def copy_last_baseline(truth: torch.Tensor, given: int) -> torch.Tensor:
    """(N, T, H, W): the given frames, then the last of them repeated."""
    out = truth.clone()
    out[:, given:] = truth[:, given - 1 : given]
    return out


def constant_velocity_baseline(truth: torch.Tensor, given: int, threshold: float) -> torch.Tensor:
    """(N, T, H, W): the given frames, then the last of them moved k x the velocity of the last
    two given frames' centroids, k frames ahead (no velocity where a centroid is missing)."""
    out = truth.clone()
    last = truth[:, given - 1]
    if given >= 2:
        found = centroids(truth[:, given - 2 : given], threshold)
        velocity = torch.nan_to_num(found[:, 1] - found[:, 0], nan=0.0)
    else:
        velocity = torch.zeros(len(truth), 2)
    for ahead, frame in enumerate(range(given, truth.shape[1]), start=1):
        out[:, frame] = shift_frames(last, ahead * velocity)
    return out


def prediction_scores(
    predicted: torch.Tensor, truth: torch.Tensor, given: int, threshold: float
) -> dict[str, FrameScores]:
    """Scores of the frames after the ``given`` ones, (N, T - given) each, for the model and the
    baselines, all by score_frames against the truth."""
    candidates = {
        MODEL: predicted,
        COPY_LAST: copy_last_baseline(truth, given),
        CONSTANT_VELOCITY: constant_velocity_baseline(truth, given, threshold),
    }
    target = truth[:, given:].float()
    return {kind: score_frames(frames[:, given:].float(), target, threshold) for kind, frames in candidates.items()}


def _frame_columns(scores: FrameScores, column: int) -> FrameScores:
    return FrameScores(**{name: value[:, column : column + 1] for name, value in vars(scores).items()})


def prediction_summary(scores: FrameScores, given: int) -> dict[str, Any]:
    """Means over the predicted frames and per frame (its video frame index), the same keys for
    the model and the baselines."""
    def numbers(part: FrameScores) -> dict[str, Any]:
        s = summarise(part)
        return {
            "psnr_db": s["psnr_db"], "centroid_error_px": s["centroid_error_px"],
            "centroid_misses": int(part.centroid_missed.sum()), "object_frames": s["object_frames"],
            "single_object_share": s["single_object_share"],
            # What a user sees as a miss: the truth shows the object, the prediction nothing visible
            # (a faint smudge above the threshold has a centroid, so it is no centroid miss).
            "frames_without_object": int((part.has_object & (part.objects == 0)).sum()),
        }

    frames = scores.psnr.shape[1]
    return {
        **numbers(scores),
        "videos": int(scores.psnr.shape[0]),
        "per_frame": [{"frame": given + j, **numbers(_frame_columns(scores, j))} for j in range(frames)],
    }


def prediction_section(
    predicted: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], given: int,
    threshold: float,
) -> dict[str, Any]:
    scores = prediction_scores(predicted, truth, given, threshold)
    per_class = {}
    for class_id, name in enumerate(classes):
        rows = labels == class_id
        if bool(rows.any()):
            per_class[name] = {kind: prediction_summary(scores[kind].select(rows), given) for kind in PREDICTION_KINDS}
    return {
        "videos": len(truth),
        "given_frames": given,
        "predicted_frames": truth.shape[1] - given,
        "overall": {kind: prediction_summary(scores[kind], given) for kind in PREDICTION_KINDS},
        "per_class": per_class,
    }
