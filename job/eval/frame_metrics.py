"""Quality metrics of reconstructed (or predicted) frames, the same code for the model and every
baseline (docs/evaluation.md).

Pure functions on torch tensors, so that each can be checked on crafted inputs. Frames are
(N, T, H, W) in [0, 1]; every per-frame score comes back as (N, T), with NaN where a score is
undefined for that frame (see ``FrameScores``), and ``summarise`` reduces them to numbers.

Definitions:

- MSE and PSNR per frame, data range 1: ``psnr = 10 * log10(1 / mse)``. A perfect frame has no
  finite PSNR, so MSE is floored at ``MSE_FLOOR`` = 1e-10, which caps PSNR at 100 dB.
- SSIM per frame (2D), through torchmetrics, with the usual Gaussian window (11 px, std 1.5)
  shrunk to fit frames smaller than that. Not a 3D volume: time is not a spatial axis.
- Object pixels: target > ``threshold`` (the model's ``foreground_threshold``). Foreground
  PSNR is the PSNR of the MSE over a frame's object pixels; frames without any are skipped.
- Object centroid: the intensity-weighted mean position of a frame's pixels above
  ``threshold``. Only those pixels count, because a faint haze over the >95% black background
  would otherwise drag the centroid towards the frame centre and measure the haze, not the
  object. The centroid error is the Euclidean distance, in pixels, between the target's and
  the reconstruction's centroids, over frames where the target shows the object. Where the
  reconstruction has no pixel above the threshold it has no centroid: that frame is a *miss*,
  counted in the miss rate and left out of the error (an all-black reconstruction misses 100%).
- Objects in a frame: connected components (8-connected) of the pixels that, rounded to 8 bits
  like the data, reach the data's visibility threshold. A real frame shows exactly one; a
  tokenizer whose reconstructions split it, or sprinkle specks, caps what stage 2 can generate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from job.data.shards import VISIBLE_PIXEL

# What each set of frames is scored as: the model, and baselines that go through the same code.
MODEL = "model"
BLACK = "baseline_black"
MEAN_FRAME = "baseline_mean_frame"
COPY_LAST = "baseline_copy_last"
CONSTANT_VELOCITY = "baseline_constant_velocity"

PSNR_CAP_DB = 100.0
MSE_FLOOR = 10.0 ** (-PSNR_CAP_DB / 10.0)
# Wang et al. (2004): an 11x11 Gaussian window of standard deviation 1.5.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


# --- reconstruction quality -----------------------------------------------------------------


def frame_mse(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each frame: (N, T, H, W) -> (N, T)."""
    return (recon.float() - target.float()).pow(2).mean(dim=(-2, -1))


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for data range 1, capped at PSNR_CAP_DB (MSE floored at MSE_FLOOR)."""
    return 10.0 * torch.log10(1.0 / mse.clamp_min(MSE_FLOOR))


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """Size and std of the SSIM Gaussian window: the usual 11 px / 1.5, or the largest odd size that
    fits a smaller frame with a proportionally smaller std. torchmetrics derives the Gaussian's size
    from the std (``int(3.5 * sigma + 0.5) * 2 + 1``), so the std chosen here yields this size."""
    size = min(SSIM_WINDOW, height, width)
    if size % 2 == 0:  # a window needs a centre pixel
        size -= 1
    return size, SSIM_SIGMA * size / SSIM_WINDOW


def frame_ssim(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each frame as a 2D image: (N, T, H, W) -> (N, T)."""
    n, t, height, width = target.shape
    size, sigma = ssim_window(height, width)
    values = structural_similarity_index_measure(
        recon.float().reshape(n * t, 1, height, width),
        target.float().reshape(n * t, 1, height, width),
        gaussian_kernel=True, sigma=sigma, kernel_size=size, data_range=1.0, reduction="none",
    )
    return values.reshape(n, t)


def foreground_psnr(recon: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """PSNR over each frame's object pixels (target > threshold): (N, T); NaN where a frame has none."""
    is_object = (target > threshold).float()
    count = is_object.sum(dim=(-2, -1))
    squared_error = (recon.float() - target.float()).pow(2) * is_object
    mse = squared_error.sum(dim=(-2, -1)) / count.clamp_min(1.0)
    return torch.where(count > 0, psnr_from_mse(mse), torch.nan)


def centroids(frames: torch.Tensor, threshold: float) -> torch.Tensor:
    """Intensity-weighted (row, col) of the pixels above ``threshold`` in each frame: (N, T, 2);
    NaN where a frame has no such pixel."""
    weights = frames.float() * (frames > threshold)
    height, width = frames.shape[-2:]
    rows = torch.arange(height, dtype=weights.dtype, device=weights.device)
    cols = torch.arange(width, dtype=weights.dtype, device=weights.device)
    mass = weights.sum(dim=(-2, -1))
    row = (weights.sum(dim=-1) * rows).sum(dim=-1) / mass
    col = (weights.sum(dim=-2) * cols).sum(dim=-1) / mass
    return torch.where((mass > 0).unsqueeze(-1), torch.stack([row, col], dim=-1), torch.nan)


def visible(frames: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool: pixels that, rounded to 8 bits like the data, reach VISIBLE_PIXEL."""
    return torch.round(frames.float() * 255.0) >= VISIBLE_PIXEL


def object_counts(frames: torch.Tensor) -> torch.Tensor:
    """(N, T) the number of objects in each frame of (N, T, H, W): connected components (8-connected)
    of visible pixels, found by spreading the largest pixel id through each component."""
    mask = visible(frames).flatten(0, 1)  # (F, H, W)
    ids = torch.arange(1, mask[0].numel() + 1, dtype=torch.float32, device=mask.device).view(mask.shape[1:])
    ids = ids.expand_as(mask)
    labels = torch.where(mask, ids, 0.0)
    while True:
        spread = torch.where(mask, F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0], 0.0)
        if torch.equal(spread, labels):
            break
        labels = spread
    # Each component keeps the largest id of its pixels: counted once, at the pixel that has it.
    return ((labels == ids) & mask).sum(dim=(-2, -1)).view(frames.shape[:2])


def single_object_share(frames: torch.Tensor) -> float | None:
    """Of the frames that show an object, the share that show exactly one."""
    counts = object_counts(frames)
    shown = counts > 0
    return float((counts[shown] == 1).double().mean()) if bool(shown.any()) else None


@dataclass
class FrameScores:
    """Per-frame scores of a set of reconstructions, each (N, T)."""

    mse: torch.Tensor
    psnr: torch.Tensor
    ssim: torch.Tensor
    foreground_psnr: torch.Tensor  # NaN where the target frame has no object pixels
    centroid_error: torch.Tensor  # pixels; NaN where the target has no object or the reconstruction misses it
    has_object: torch.Tensor  # bool: the target frame has object pixels
    centroid_missed: torch.Tensor  # bool: the target has an object, the reconstruction no pixel above threshold
    objects: torch.Tensor  # the reconstruction's objects (object_counts)

    def cpu(self) -> FrameScores:
        return FrameScores(**{f.name: getattr(self, f.name).cpu() for f in dataclasses.fields(self)})

    def select(self, samples: torch.Tensor) -> FrameScores:
        """The rows (samples) where ``samples`` (N,) is true."""
        return FrameScores(**{f.name: getattr(self, f.name)[samples] for f in dataclasses.fields(self)})

    @staticmethod
    def cat(parts: list[FrameScores]) -> FrameScores:
        return FrameScores(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(FrameScores)}
        )


def score_frames(recon: torch.Tensor, target: torch.Tensor, threshold: float) -> FrameScores:
    """Every per-frame score of ``recon`` against ``target``, both (N, T, H, W) in [0, 1]."""
    mse = frame_mse(recon, target)
    target_centroids = centroids(target, threshold)
    recon_centroids = centroids(recon, threshold)
    has_object = ~target_centroids[..., 0].isnan()
    return FrameScores(
        mse=mse,
        psnr=psnr_from_mse(mse),
        ssim=frame_ssim(recon, target),
        foreground_psnr=foreground_psnr(recon, target, threshold),
        centroid_error=(recon_centroids - target_centroids).norm(dim=-1),
        has_object=has_object,
        centroid_missed=has_object & recon_centroids[..., 0].isnan(),
        objects=object_counts(recon),
    )


def summarise(scores: FrameScores) -> dict[str, Any]:
    """Means over frames (float64); None where no frame defines a score."""
    mse = scores.mse.double()
    object_frames = int(scores.has_object.sum())
    one_object = scores.objects[scores.has_object] == 1
    return {
        "frames": mse.numel(),
        "mse": _number(mse.mean()),
        "psnr_db": _number(scores.psnr.double().mean()),
        "psnr_of_mean_mse_db": _number(psnr_from_mse(mse.mean())),
        "ssim": _number(scores.ssim.double().mean()),
        "foreground_psnr_db": _number(scores.foreground_psnr.double().nanmean()),
        "centroid_error_px": _number(scores.centroid_error.double().nanmean()),
        "centroid_miss_rate": int(scores.centroid_missed.sum()) / object_frames if object_frames else None,
        "object_frames": object_frames,
        # Of the frames whose target shows the object, those where the reconstruction shows exactly one.
        "single_object_share": float(one_object.double().mean()) if object_frames else None,
    }


def _number(value: torch.Tensor) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None
