"""How good generated videos are, each number beside the same number for real test videos
(docs/generation.md): class accuracy by the judges of codes (the probe and the code-track judge,
on the generated videos re-encoded) and by the pixel track judge (all trained on real videos),
object presence and exactly one object per frame, smoothness (the mean norm of the centroids'
second difference over time), diversity (the mean absolute pixel difference over all pairs of a
class's videos), and the Fréchet distance on a video classifier's features."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from job.eval.frame_metrics import centroids, single_object_share, visible
from job.eval.code_judges import CodeJudges
from job.eval.pixel_judges import PixelJudges

ENCODE_BATCH = 64  # generated videos re-encoded by the tokenizer together


def presence(frames: torch.Tensor) -> float | None:
    """Share of frames (N, T, H, W) with a visible pixel (frame_metrics.visible)."""
    if not frames.numel():
        return None
    return float(visible(frames).any(dim=(-2, -1)).double().mean())


def second_difference(frames: torch.Tensor, threshold: float) -> float | None:
    """Mean |c[t+1] - 2 c[t] + c[t-1]| (px) of the frames' centroids; NaN terms left out."""
    if frames.shape[1] < 3 or not len(frames):
        return None
    c = centroids(frames, threshold).double()
    value = float((c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]).norm(dim=-1).nanmean())
    return value if math.isfinite(value) else None


def diversity(frames: torch.Tensor) -> float | None:
    """Mean absolute pixel difference over all pairs of the videos (N, T, H, W)."""
    if len(frames) < 2:
        return None
    flat = frames.flatten(1).double()
    pairs = list(itertools.combinations(range(len(flat)), 2))
    return float(sum(float((flat[i] - flat[j]).abs().mean()) for i, j in pairs) / len(pairs))


def encode_frames(tokenizer, frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    codes = [tokenizer.encode(frames[s : s + ENCODE_BATCH, None].to(device)).cpu() for s in range(0, len(frames), ENCODE_BATCH)]
    return torch.cat(codes) if codes else torch.zeros(0, *tokenizer.latent_shape(), dtype=torch.long)


def generation_section(
    generated: torch.Tensor, generated_labels: torch.Tensor, generated_codes: torch.Tensor,
    real: torch.Tensor, real_labels: torch.Tensor, real_codes: torch.Tensor, reconstructed: torch.Tensor,
    code_judges: CodeJudges, judges: PixelJudges, reference: torch.Tensor,
    classes: tuple[str, ...], threshold: float,
) -> dict[str, Any]:
    """Frames (N, T, H, W) of generated and real (test) videos, their codes, the tokenizer's
    reconstructions of the real ones (what generation can reach through these codes: a decoder
    that splits the object or adds specks caps the judges' scores of anything generated), the
    judges of codes and the pixel judges trained on the train split, and ``reference``: as many
    other real videos as were generated (the Fréchet distance's floor)."""
    recognised = code_judges.by_probe(generated_codes) == generated_labels
    real_right = code_judges.by_probe(real_codes) == real_labels
    by_code_track = code_judges.by_track(generated_codes) == generated_labels
    real_by_code_track = code_judges.by_track(real_codes) == real_labels

    def share(right: torch.Tensor) -> float | None:
        return float(right.double().mean()) if len(right) else None
    per_class = {}
    for class_id, name in enumerate(classes):
        mine, theirs = generated_labels == class_id, real_labels == class_id
        per_class[name] = {
            "generated": int(mine.sum()),
            "accuracy": share(recognised[mine]), "real_accuracy": share(real_right[theirs]),
            "code_track_accuracy": share(by_code_track[mine]), "real_code_track_accuracy": share(real_by_code_track[theirs]),
            "presence": presence(generated[mine]), "real_presence": presence(real[theirs]),
            "smoothness_px": second_difference(generated[mine], threshold),
            "real_smoothness_px": second_difference(real[theirs], threshold),
            "reconstructed_smoothness_px": second_difference(reconstructed[theirs], threshold),
            "diversity": diversity(generated[mine]), "real_diversity": diversity(real[theirs]),
            "track_accuracy": judges.track_accuracy(generated[mine], generated_labels[mine]),
            "single_object": single_object_share(generated[mine]),
        }
    def mean_of(key: str) -> float | None:
        values = [c[key] for c in per_class.values() if c[key] is not None]
        return float(np.mean(values)) if values else None

    return {
        "videos": len(generated),
        "accuracy": share(recognised),
        "chance": 1.0 / len(classes),
        "real_accuracy": share(real_right),
        "code_track_accuracy": share(by_code_track), "real_code_track_accuracy": share(real_by_code_track),
        "real_videos": len(real),
        "presence": presence(generated), "real_presence": presence(real),
        "smoothness_px": second_difference(generated, threshold), "real_smoothness_px": second_difference(real, threshold),
        "diversity": mean_of("diversity"), "real_diversity": mean_of("real_diversity"),
        "single_object": single_object_share(generated), "real_single_object": single_object_share(real),
        "track_accuracy": judges.track_accuracy(generated, generated_labels),
        "real_track_accuracy": judges.track_accuracy(real, real_labels),
        "reconstructed": {
            "presence": presence(reconstructed), "single_object": single_object_share(reconstructed),
            "track_accuracy": judges.track_accuracy(reconstructed, real_labels),
            "smoothness_px": second_difference(reconstructed, threshold),
        },
        "frechet": {
            "generated": judges.frechet(generated, real),
            "reconstructed": judges.frechet(reconstructed, real),
            "real_reference": judges.frechet(reference, real),
            "all_black": judges.frechet(torch.zeros_like(reference), real),
            "features": "penultimate layer of a small 3D-conv classifier trained on the train split's real videos",
        },
        "per_class": per_class,
        "classifier": "evaluate's judges of codes, trained on the train split's codes: the linear probe on their "
        "LFQ bits and the code-track judge on where the codes that are not the background's go; generated videos "
        "are re-encoded by the same tokenizer",
        "track_classifier": "a linear classifier on the object's centroid track (speeds, accelerations, turns), "
        "trained on the train split's real videos",
    }
