"""The frame metrics of ``evaluate`` (job.eval.frame_metrics) on crafted frames, against values
worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from job.eval.frame_metrics import (
    PSNR_CAP_DB,
    FrameScores,
    centroids,
    frame_ssim,
    object_counts,
    psnr_from_mse,
    score_frames,
    single_object_share,
    ssim_window,
    summarise,
)

pytestmark = pytest.mark.timeout(60)

SIZE = 16
THRESHOLD = 0.05
VALUE = 0.5  # brightness of the crafted object


def blob_frame(row: int = 6, col: int = 5) -> torch.Tensor:
    """A 16x16 black frame with a 3x3 square of VALUE centred on (row, col): 9 object pixels."""
    frame = torch.zeros(SIZE, SIZE)
    frame[row - 1 : row + 2, col - 1 : col + 2] = VALUE
    return frame


def video(*frames: torch.Tensor) -> torch.Tensor:
    """One sample (1, T, H, W) of the given frames."""
    return torch.stack(frames)[None]


def test_perfect_reconstruction_scores_the_cap():
    target = video(blob_frame(), blob_frame(8, 9))
    scores = score_frames(target.clone(), target, THRESHOLD)
    assert scores.mse.tolist() == [[0.0, 0.0]]
    assert scores.psnr[0].tolist() == pytest.approx([PSNR_CAP_DB, PSNR_CAP_DB])
    assert scores.ssim[0].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert scores.foreground_psnr[0].tolist() == pytest.approx([PSNR_CAP_DB, PSNR_CAP_DB])
    assert scores.centroid_error.tolist() == [[0.0, 0.0]]
    assert not scores.centroid_missed.any()


def test_object_counts_are_connected_components():
    frames = torch.zeros(1, 4, 12, 12)
    frames[0, 0, 1:3, 1:3] = 1.0  # one blob
    frames[0, 1, 1:3, 1:3] = 1.0  # two blobs apart
    frames[0, 1, 8:10, 8:10] = 1.0
    frames[0, 2, 4, 4] = frames[0, 2, 5, 5] = 1.0  # touching diagonally: one object
    frames[0, 3, 6, 6] = 0.1  # too faint to see (below the data's visibility threshold)
    assert object_counts(frames).tolist() == [[1, 2, 1, 0]]
    assert single_object_share(frames) == 2 / 3  # of the three frames that show something


def test_a_reconstruction_that_splits_the_object_or_adds_a_speck_is_not_single_object():
    target = video(blob_frame(), blob_frame(8, 9), blob_frame(4, 4), torch.zeros(SIZE, SIZE))
    recon = target.clone()
    recon[0, 1, 14, 14] = VALUE  # a speck far from the object: two objects
    recon[0, 2] = 0.0  # the object lost
    recon[0, 3, 2, 2] = VALUE  # something where the target shows nothing: not an object frame
    scores = score_frames(recon, target, THRESHOLD)
    assert scores.objects.tolist() == [[1, 2, 0, 1]]
    assert summarise(scores)["single_object_share"] == pytest.approx(1 / 3)  # of the three object frames
    assert summarise(score_frames(torch.zeros_like(target), target, THRESHOLD))["single_object_share"] == 0.0


def test_black_reconstruction_of_a_blob():
    target = video(blob_frame())
    scores = score_frames(torch.zeros_like(target), target, THRESHOLD)
    mse = 9 * VALUE**2 / SIZE**2  # sum(x^2) / N: nine object pixels, the rest already black
    assert scores.mse.item() == pytest.approx(mse)
    assert scores.psnr.item() == pytest.approx(10 * math.log10(1 / mse))
    # Over the object pixels alone every error is VALUE: 10 log10(1 / 0.25) = 6.02 dB.
    assert scores.foreground_psnr.item() == pytest.approx(10 * math.log10(1 / VALUE**2))
    assert scores.has_object.item() and scores.centroid_missed.item()
    assert math.isnan(scores.centroid_error.item())  # a miss is not an error of 0 px
    summary = summarise(scores)
    assert summary["centroid_miss_rate"] == 1.0 and summary["centroid_error_px"] is None


def test_reconstruction_shifted_two_pixels_right():
    target = video(blob_frame(row=6, col=5))
    shifted = video(blob_frame(row=6, col=7))
    scores = score_frames(shifted, target, THRESHOLD)
    assert scores.centroid_error.item() == pytest.approx(2.0)
    # Columns 4..6 versus 6..8: column 6 overlaps (3 pixels, no error); 6 pixels are lit only in
    # the target and 6 only in the shift, each off by VALUE.
    assert scores.mse.item() == pytest.approx(12 * VALUE**2 / SIZE**2)
    # Of the 9 object pixels of the target, 6 are now black: 6 * 0.25 / 9.
    assert scores.foreground_psnr.item() == pytest.approx(10 * math.log10(9 / (6 * VALUE**2)))
    assert not scores.centroid_missed.item()


def test_centroid_is_intensity_weighted_and_ignores_faint_haze():
    frame = torch.full((SIZE, SIZE), THRESHOLD / 2)  # haze below the threshold: not the object
    frame[2, 3], frame[2, 5] = 0.3, 0.9  # centroid column (3 * 0.3 + 5 * 0.9) / 1.2 = 4.5
    assert centroids(frame[None, None], THRESHOLD)[0, 0].tolist() == pytest.approx([2.0, 4.5])
    assert centroids(torch.zeros(1, 1, SIZE, SIZE), THRESHOLD).isnan().all()


def test_frames_without_object_are_left_out_of_object_scores():
    target = video(blob_frame(), torch.zeros(SIZE, SIZE))
    summary = summarise(score_frames(target.clone(), target, THRESHOLD))
    assert summary["frames"] == 2 and summary["object_frames"] == 1
    assert summary["centroid_miss_rate"] == 0.0 and summary["centroid_error_px"] == 0.0


def test_ssim_is_per_frame_not_per_volume():
    target = video(blob_frame(), blob_frame(9, 9))
    recon = video(blob_frame(), torch.zeros(SIZE, SIZE))  # frame 0 perfect, frame 1 black
    ssim = frame_ssim(recon, target)
    assert ssim.shape == (1, 2)
    assert ssim[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert ssim[0, 1].item() < 0.95
    # Each frame stands alone: scoring frame 1 by itself gives the same value.
    assert frame_ssim(recon[:, 1:], target[:, 1:])[0, 0].item() == pytest.approx(ssim[0, 1].item(), abs=1e-6)


@pytest.mark.parametrize("height", [3, 5, 7, 8, 9, 11, 16, 64])
def test_ssim_window_fits_the_frame_and_matches_torchmetrics_gaussian(height):
    size, sigma = ssim_window(height, height)
    assert size % 2 == 1 and size <= min(height, 11)
    assert int(3.5 * sigma + 0.5) * 2 + 1 == size  # the size torchmetrics derives from sigma
    frames = torch.rand(1, 2, height, height)
    assert frame_ssim(frames, frames)[0].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_psnr_cap_and_formula():
    assert psnr_from_mse(torch.tensor([0.0, 1e-2, 1.0])).tolist() == pytest.approx([PSNR_CAP_DB, 20.0, 0.0])


def test_summary_averages_psnr_per_frame_and_reports_psnr_of_mean_mse():
    target = video(blob_frame(), blob_frame(9, 9))
    recon = video(blob_frame(), torch.zeros(SIZE, SIZE))
    summary = summarise(score_frames(recon, target, THRESHOLD))
    black_mse = 9 * VALUE**2 / SIZE**2
    assert summary["mse"] == pytest.approx(black_mse / 2)
    assert summary["psnr_db"] == pytest.approx((PSNR_CAP_DB + 10 * math.log10(1 / black_mse)) / 2)
    assert summary["psnr_of_mean_mse_db"] == pytest.approx(10 * math.log10(2 / black_mse))
    assert summary["centroid_miss_rate"] == 0.5


def test_frame_scores_select_and_cat_keep_rows_together():
    target = torch.cat([video(blob_frame()), video(blob_frame(9, 9))])
    scores = score_frames(torch.zeros_like(target), target, THRESHOLD)
    both = FrameScores.cat([scores.select(torch.tensor([True, False])), scores.select(torch.tensor([False, True]))])
    assert torch.equal(both.mse, scores.mse) and torch.equal(both.centroid_missed, scores.centroid_missed)
