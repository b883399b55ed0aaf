"""Stage 2's prediction scores and baselines (job.eval.prediction) on crafted videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from job.eval.frame_metrics import CONSTANT_VELOCITY, COPY_LAST, MODEL, PSNR_CAP_DB
from job.eval.goals import generation_goals
from job.eval.prediction import (
    PREDICTION_KINDS,
    constant_velocity_baseline,
    prediction_scores,
    prediction_section,
    prediction_summary,
    shift_frames,
)
from tests.blobs import blob_videos, linear_blobs

pytestmark = pytest.mark.timeout(600)
THRESHOLD = 0.05
SUMMARY_KEYS = {"psnr_db", "centroid_error_px", "centroid_misses", "object_frames", "single_object_share",
                "frames_without_object", "videos", "per_frame"}


# --- prediction metrics and baselines, on crafted videos -------------------------------------------


def test_a_perfect_prediction_scores_the_psnr_cap_and_no_centroid_error():
    truth = linear_blobs()
    scores = prediction_scores(truth.clone(), truth, given=3, threshold=THRESHOLD)
    summary = prediction_summary(scores[MODEL], given=3)
    assert summary["psnr_db"] == pytest.approx(PSNR_CAP_DB)
    assert summary["centroid_error_px"] == pytest.approx(0.0, abs=1e-6)
    assert summary["centroid_misses"] == 0 and summary["object_frames"] == 9
    assert [p["frame"] for p in summary["per_frame"]] == [3, 4, 5]


def test_copy_last_scores_like_a_model_that_copies_the_last_given_frame():
    truth = linear_blobs()
    copying = truth.clone()
    copying[:, 3:] = truth[:, 2:3]  # a "model" that repeats frame 2
    scores = prediction_scores(copying, truth, given=3, threshold=THRESHOLD)
    model, copy_last = prediction_summary(scores[MODEL], 3), prediction_summary(scores[COPY_LAST], 3)
    assert model == copy_last
    assert model["centroid_error_px"] > 0.5  # the blobs move: copying is not perfect


def test_constant_velocity_is_exact_on_linear_motion_by_whole_pixels():
    truth = linear_blobs()
    predicted = constant_velocity_baseline(truth, given=3, threshold=THRESHOLD)
    assert torch.allclose(predicted, truth, atol=1e-4)
    summary = prediction_summary(prediction_scores(truth, truth, 3, THRESHOLD)[CONSTANT_VELOCITY], 3)
    assert summary["centroid_error_px"] == pytest.approx(0.0, abs=1e-3)


def test_shift_frames_moves_by_sub_pixels_and_brings_in_black():
    frame = blob_videos(np.array([[[7.0, 7.0]]]))[:, 0]
    assert torch.allclose(shift_frames(frame, torch.tensor([[2.0, -3.0]])), torch.roll(frame, (2, -3), (1, 2)), atol=1e-5)
    half = shift_frames(frame, torch.tensor([[0.0, 0.5]]))
    from job.eval.frame_metrics import centroids
    assert float(centroids(half[:, None], 0.0)[0, 0, 1]) == pytest.approx(7.5, abs=1e-3)
    gone = shift_frames(frame, torch.tensor([[0.0, 40.0]]))
    assert float(gone.abs().max()) == 0.0


def test_prediction_section_has_the_same_keys_for_model_and_baselines_overall_and_per_class():
    truth = linear_blobs()
    section = prediction_section(truth.flip(1), truth, torch.tensor([0, 1, 1]), ("a", "b", "c"), 3, THRESHOLD)
    assert set(section["overall"]) == set(PREDICTION_KINDS)
    assert set(section["per_class"]) == {"a", "b"}  # c has no video
    for by_kind in (section["overall"], *section["per_class"].values()):
        for kind in PREDICTION_KINDS:
            assert set(by_kind[kind]) == SUMMARY_KEYS
            assert len(by_kind[kind]["per_frame"]) == 3
    assert section["per_class"]["b"][MODEL]["videos"] == 2


def test_blobs_either_side_of_the_truth_do_not_pass_for_a_prediction():
    """Two blobs whose centroid is the true one: no centroid error and no miss, but a frame with two
    objects is not a prediction; the goals need one object in >= 95% of the predicted frames."""
    path = np.array([[[4.0 + t, 5.0 + t] for t in range(6)], [[5.0, 4.0 + t] for t in range(6)]])
    split = torch.maximum(blob_videos(path + [0.0, 3.0]), blob_videos(path - [0.0, 3.0]))
    truth = blob_videos(path)
    labels = torch.tensor([1, 1])  # circular, a class the constant-velocity goal is held on
    section = prediction_section(split, truth, labels, ("linear", "circular"), given=3, threshold=THRESHOLD)
    model = section["overall"][MODEL]
    assert model["centroid_error_px"] < 0.05 and model["centroid_misses"] == 0
    assert model["single_object_share"] == 0.0
    nothing_generated = {"accuracy": 0.0, "real_accuracy": 1.0, "track_accuracy": 0.0, "presence": 0.0, "single_object": 0.0, "per_class": {}}
    goals = generation_goals(nothing_generated, section)
    assert not goals["prediction_centroid_below_constant_velocity"]["met"]
    assert not goals["prediction_centroid_below_constant_velocity_circular"]["met"]
    honest = prediction_section(truth.clone(), truth, labels, ("linear", "circular"), given=3, threshold=THRESHOLD)
    assert honest["overall"][MODEL]["single_object_share"] == 1.0


def test_a_faint_smudge_where_the_object_goes_is_a_frame_without_the_object():
    """A prediction drawn below the data's visibility (51/255) but above the foreground threshold
    has a centroid, near the truth: not a centroid miss. A user sees a black frame, so the miss-rate
    goal counts it as a frame without the object."""
    truth = linear_blobs()
    faint = truth.clone()
    faint[:, 3:] *= 0.15  # its peak, 38/255, is above 0.05 and below the visibility threshold
    section = prediction_section(faint, truth, torch.tensor([0, 0, 0]), ("linear",), given=3, threshold=THRESHOLD)
    model = section["overall"][MODEL]
    assert model["centroid_misses"] == 0 and model["centroid_error_px"] < 0.05
    assert model["frames_without_object"] == model["object_frames"] == 9
    assert [p["frames_without_object"] for p in model["per_frame"]] == [3, 3, 3]
    nothing_generated = {"accuracy": 0.0, "real_accuracy": 1.0, "track_accuracy": 0.0, "presence": 0.0, "single_object": 0.0, "per_class": {}}
    goals = generation_goals(nothing_generated, section)
    assert goals["prediction_miss_rate"]["value"] == 1.0 and not goals["prediction_miss_rate"]["met"]
    seen = prediction_section(truth.clone(), truth, torch.tensor([0, 0, 0]), ("linear",), given=3, threshold=THRESHOLD)
    assert seen["overall"][MODEL]["frames_without_object"] == 0
    assert generation_goals(nothing_generated, seen)["prediction_miss_rate"]["met"]
