"""``python -m job evaluate`` end to end on a copy of the smoke run, and its choice of checkpoint."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from job.checkpoints.reader import CheckpointReader
from job.config import config_from_dict
from job.data.dataset import VideoDataset
from job.eval.reconstruction import KINDS
from job.inference.load import load_best_checkpoint
from job.storage import RunStore
from tests.helpers import ROOT, checkpoint_state, job_env, log_events, rewrite_state, run_job

pytestmark = pytest.mark.timeout(300)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {
    "frames", "mse", "psnr_db", "psnr_of_mean_mse_db", "ssim", "foreground_psnr_db", "centroid_error_px",
    "centroid_miss_rate", "object_frames", "single_object_share",
}


@pytest.fixture(scope="module")
def evaluated(smoke_baseline, tmp_path_factory) -> tuple[Path, dict, str]:
    """A copy of the smoke run, evaluated once: (run folder, report.json, stdout)."""
    run = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(smoke_baseline, run)
    result = run_job("evaluate", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return run, json.loads((run / "eval" / "report.json").read_text()), result.stdout


def run_job_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=60
    )


def run_config(run: Path):
    return config_from_dict(json.loads((run / "config.json").read_text()))


def split_frames(run: Path, split: str) -> np.ndarray:
    """The split's frames (N, T, H, W) as float64, read without the job's metric code."""
    cfg = run_config(run)
    dataset = VideoDataset(run / "data", cfg.data, verify=False)
    videos, _ = dataset.get(dataset.split(split))
    return videos[:, 0].double().numpy()


def test_report_has_every_section(evaluated):
    run, report, _ = evaluated
    classes = list(run_config(run).data.classes)
    assert report["split"] == "test"
    assert report["samples"] == len(split_frames(run, "test"))
    assert report["checkpoint"].startswith("step-") and isinstance(report["checkpoint_step"], int)
    assert report["seconds"] > 0 and report["created_at"]
    assert set(report["metrics"]) == set(KINDS)
    for kind in KINDS:
        assert set(report["metrics"][kind]) == SUMMARY_KEYS
    assert set(report["per_class"]) == set(classes)
    assert sum(entry["samples"] for entry in report["per_class"].values()) == report["samples"]
    for entry in report["per_class"].values():
        for kind in KINDS:
            assert set(entry[kind]) == SUMMARY_KEYS
    assert {"usage", "perplexity", "codebook_size", "tokens", "object", "far_background", "black_video_codes"} <= set(
        report["codebook"]
    )
    assert 0 < report["codebook"]["usage"] <= 1 and 1 <= report["codebook"]["perplexity"] <= 64
    for goal in report["goals"].values():
        assert {"value", "target", "comparison", "met"} <= set(goal) and isinstance(goal["met"], bool)
    # The smoke run has a stage 2: its goals join the tokenizer's (tests/drills/test_sampling.py checks them).
    assert {
        "psnr_above_black_db", "ssim", "foreground_psnr_above_black_db", "centroid_error_px", "classifier_accuracy",
        "far_background_code_perplexity", "reconstruction_single_object",
    } <= set(report["goals"])


def test_goals_are_the_issues_targets(evaluated):
    _, report, _ = evaluated
    goals, model, black = report["goals"], report["metrics"]["model"], report["metrics"]["baseline_black"]
    expected = {
        "psnr_above_black_db": (10.0, ">="), "ssim": (0.95, ">="), "foreground_psnr_above_black_db": (15.0, ">="),
        "centroid_error_px": (0.5, "<="), "classifier_accuracy": (0.98, ">="),
        "far_background_code_perplexity": (2.0, "<="), "reconstruction_single_object": (0.95, ">="),
    }
    assert {name: (g["target"], g["comparison"]) for name, g in goals.items() if name in expected} == expected
    assert goals["psnr_above_black_db"]["value"] == pytest.approx(model["psnr_db"] - black["psnr_db"])
    assert goals["foreground_psnr_above_black_db"]["value"] == pytest.approx(
        model["foreground_psnr_db"] - black["foreground_psnr_db"]
    )
    assert goals["reconstruction_single_object"]["value"] == model["single_object_share"]
    assert black["single_object_share"] == 0.0  # an all-black frame shows no object
    assert goals["ssim"]["baseline_black"] == black["ssim"]
    assert goals["ssim"]["met"] == (model["ssim"] >= 0.95 and model["ssim"] > black["ssim"])
    assert goals["centroid_error_px"]["max_miss_rate"] == 0.01
    miss_ok = model["centroid_miss_rate"] <= 0.01
    assert goals["centroid_error_px"]["met"] == (model["centroid_error_px"] <= 0.5 and miss_ok)


def test_numbers_are_finite_except_the_black_centroid(evaluated):
    _, report, _ = evaluated
    for kind in KINDS:
        for key, value in report["metrics"][kind].items():
            if kind == "baseline_black" and key == "centroid_error_px":
                assert value is None  # it never shows the object: no centroid to compare
            else:
                assert value is not None and math.isfinite(value), (kind, key)
    assert report["metrics"]["baseline_black"]["centroid_miss_rate"] == 1.0


def test_baselines_match_an_independent_computation(evaluated):
    run, report, _ = evaluated
    test, train = split_frames(run, "test"), split_frames(run, "train")
    black, mean_frame = report["metrics"]["baseline_black"], report["metrics"]["baseline_mean_frame"]

    assert black["mse"] == pytest.approx(np.mean(test**2), rel=1e-5)
    assert black["psnr_of_mean_mse_db"] == pytest.approx(10 * math.log10(1 / np.mean(test**2)), rel=1e-5)
    frame_psnr = 10 * np.log10(1 / np.maximum(np.mean(test**2, axis=(2, 3)), 1e-10))
    assert black["psnr_db"] == pytest.approx(frame_psnr.mean(), rel=1e-5)
    assert mean_frame["mse"] == pytest.approx(np.mean((test - train.mean(axis=0)) ** 2), rel=1e-4)
    # Over the object pixels a black frame is off by the pixel itself.
    assert black["foreground_psnr_db"] < black["psnr_db"]


def test_model_finds_the_object_better_than_black(evaluated):
    # The smoke model trains 4 tiny epochs; tests/drills/test_quality.py holds it to margins over the
    # baselines. Here only the report's own consistency with a model that draws something.
    _, report, _ = evaluated
    model, black = report["metrics"]["model"], report["metrics"]["baseline_black"]
    assert model["foreground_psnr_db"] > black["foreground_psnr_db"]
    assert model["centroid_miss_rate"] < 1.0


def test_classifier_confusion_matrix(evaluated):
    run, report, _ = evaluated
    classifier = report["classifier"]
    classes = list(run_config(run).data.classes)
    matrix = np.array(classifier["confusion_matrix"])
    assert classifier["classes"] == classes
    assert matrix.shape == (len(classes), len(classes))
    assert matrix.sum() == classifier["test_samples"] == report["samples"]
    assert matrix.sum(axis=1).tolist() == [report["per_class"][name]["samples"] for name in classes]
    assert classifier["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert classifier["chance"] == pytest.approx(1 / len(classes))
    assert classifier["train_samples"] == len(split_frames(run, "train"))
    assert classifier["features"]
    assert 0.0 <= classifier["track_accuracy"] <= 1.0 and classifier["track_judge"]


def test_images_and_markdown(evaluated):
    run, report, _ = evaluated
    classes = run_config(run).data.classes
    assert report["images"] == {name: f"eval/{name}.png" for name in classes}
    markdown = (run / "eval" / "report.md").read_text()
    for name in classes:
        assert (run / "eval" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert f"![{name}]({name}.png)" in markdown
    for heading in ("| metric | model | all-black | mean-frame |", "| true \\ predicted |", "chance"):
        assert heading in markdown


def test_summary_on_stdout(evaluated):
    run, report, stdout = evaluated
    assert any(event.get("event") == "evaluate.done" for event in log_events(stdout))
    m = report["metrics"]
    rows = {line.split("  ")[0]: line.split() for line in stdout.splitlines()}
    # The model beside both baselines, one row per metric, in that column order.
    assert rows["PSNR (dB)"][-3:] == [f"{m[k]['psnr_db']:.2f}" for k in KINDS]
    assert rows["SSIM"][-3:] == [f"{m[k]['ssim']:.4f}" for k in KINDS]
    assert rows["foreground PSNR (dB)"][-3:] == [f"{m[k]['foreground_psnr_db']:.2f}" for k in KINDS]
    assert "code classifier accuracy" in stdout and "code-track judge" in stdout
    for name, goal in report["goals"].items():
        assert rows[name][-1] == ("yes" if goal["met"] else "NO")
    met = sum(goal["met"] for goal in report["goals"].values())
    assert f"goals met: {met}/{len(report['goals'])}" in stdout
    # `make demo` prints the same summary again at its end, from report.json.
    again = run_job_python(f"from job.eval.report import print_summary; print_summary({str(run)!r})")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() in stdout


def test_evaluation_is_deterministic(evaluated):
    run, report, _ = evaluated
    result = run_job("evaluate", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 0, result.stderr
    again = json.loads((run / "eval" / "report.json").read_text())
    for key in ("metrics", "per_class", "codebook", "classifier", "goals", "checkpoint"):
        assert again[key] == report[key], key


def test_no_valid_checkpoint_exits_2(tmp_path):
    result = run_job("evaluate", "--preset", "smoke", "--run-uri", str(tmp_path / "empty"))
    assert result.returncode == 2, result.stderr
    assert "nothing to evaluate" in result.stderr


# --- which checkpoint: the best, or the newest valid one when the best fails verification ----


def record_best(run: Path, checkpoint: str, best: str) -> None:
    """Make ``checkpoint`` record ``best`` as the run's best, keeping its manifest consistent."""
    folder = run / "checkpoints" / checkpoint
    state = checkpoint_state(folder)
    state["best"] = {"checkpoint": best, "val_loss": 0.0}
    rewrite_state(folder, state)


@pytest.fixture
def run_with_older_best(smoke_baseline, tmp_path) -> tuple[CheckpointReader, str, str]:
    """A copy of the smoke run whose newest checkpoint names an older one as the best."""
    run = tmp_path / "run"
    shutil.copytree(smoke_baseline, run)
    checkpointer = CheckpointReader(RunStore(str(run)))
    *older, newest = checkpointer.committed()
    assert older, "the smoke run keeps more than one checkpoint"
    record_best(run, newest, older[-1])
    return checkpointer, older[-1], newest


def test_best_checkpoint_is_used(run_with_older_best):
    checkpointer, best, _ = run_with_older_best
    checkpoint, choice = load_best_checkpoint(checkpointer)
    assert checkpoint.name == best and "best" in choice


def test_corrupt_best_falls_back_to_newest_valid(run_with_older_best):
    checkpointer, best, newest = run_with_older_best
    model_file = checkpointer.store.root / "checkpoints" / best / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    checkpoint, choice = load_best_checkpoint(checkpointer)
    assert checkpoint.name == newest
    assert best in choice and "fails verification" in choice
