"""Stage 2's modes (SPEC §15) on the smoke run: ``sample``, ``predict``, and the generation and
prediction sections of ``evaluate``; refusals without a trained stage 2; s3:// runs from an empty
cache."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from job.config import build_config
from job.eval.prediction import PREDICTION_KINDS
from job.modes.sample import run as sample
from job.storage import RunStore
from tests.helpers import job_env, run_job

pytestmark = pytest.mark.timeout(600)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {"psnr_db", "centroid_error_px", "centroid_misses", "object_frames", "single_object_share",
                "frames_without_object", "videos", "per_frame"}


# --- the modes, end to end on a copy of the smoke run ---------------------------------------------


def smoke_classes(run: Path) -> list[str]:
    return json.loads((run / "config.json").read_text())["data"]["classes"]


@pytest.fixture(scope="module")
def stage2_run(smoke_baseline, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the smoke run, with sample (3 per class), predict and evaluate run once in it:
    (run folder, stdout of each mode)."""
    run = tmp_path_factory.mktemp("stage2") / "run"
    shutil.copytree(smoke_baseline, run)
    outputs = {}
    for mode, extra in (("sample", ["--set", "stage2.samples_per_class=3"]), ("predict", []), ("evaluate", [])):
        result = run_job(mode, "--preset", "smoke", "--run-uri", str(run), *extra, timeout=300)
        assert result.returncode == 0, result.stderr + result.stdout[-3000:]
        outputs[mode] = result.stdout
    return run, outputs


def test_sample_writes_n_videos_per_class(stage2_run):
    from PIL import Image

    run, _ = stage2_run
    index = json.loads((run / "samples" / "index.json").read_text())
    classes = smoke_classes(run)
    assert index["samples_per_class"] == 3 and index["seed"] == 0 and index["steps"] == 6  # smoke's sample_steps
    assert index["checkpoint"].startswith("step-") and index["tokenizer_checkpoint"].startswith("step-")
    assert [v["class"] for v in index["videos"]] == [c for c in classes for _ in range(3)]
    frames, height, width = index["shape"]
    for video in index["videos"]:
        png = (run / "samples" / video["png"]).read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        assert Image.open(run / "samples" / video["gif"]).n_frames == frames
        array = np.load(run / "samples" / video["npy"], allow_pickle=False)
        assert array.shape == (frames, height, width) and array.dtype == np.float32
        assert 0.0 <= array.min() and array.max() <= 1.0


def rerun_on_a_copy(run: Path, tmp_path: Path, mode: str, folder: str, *settings: str) -> tuple[dict, dict, Path]:
    """``mode`` again on a copy of ``run`` without its ``folder``, with ``--set`` each of
    ``settings``: (the run's index.json, the copy's, the copy)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / folder)
    sets = [arg for setting in settings for arg in ("--set", setting)]
    result = run_job(mode, "--preset", "smoke", "--run-uri", str(copy), *sets, timeout=300)
    assert result.returncode == 0, result.stderr
    return (json.loads((run / folder / "index.json").read_text()), json.loads((copy / folder / "index.json").read_text()),
            copy)


def test_sample_is_deterministic_for_a_seed(stage2_run, tmp_path):
    run, _ = stage2_run
    index, other, copy = rerun_on_a_copy(run, tmp_path, "sample", "samples", "stage2.samples_per_class=3",
                                         "stage2.sample_seed=1")
    assert other["seed"] == 1
    differ = [not np.array_equal(np.load(run / "samples" / a["npy"]), np.load(copy / "samples" / b["npy"]))
              for a, b in zip(index["videos"], other["videos"])]
    assert any(differ), "another seed gave the very same videos"
    # The same seed again, in this process: the same bytes as the command's.
    cfg = build_config("smoke", None, ["stage2.samples_per_class=3"])
    store = RunStore.for_job(str(copy), None, cfg.storage)
    try:
        sample(cfg, store)
    finally:
        store.close()
        torch.use_deterministic_algorithms(False)  # pick_device turned it on for this process
    for video in index["videos"]:
        assert (copy / "samples" / video["npy"]).read_bytes() == (run / "samples" / video["npy"]).read_bytes()


def test_sample_takes_its_sampling_settings_from_the_command_line(stage2_run, tmp_path):
    """Not from the run's training config: guidance and the decoding order (by confidence alone,
    one latent frame after another) reach the sampler (the same seed draws other videos) and
    samples/index.json says what made them."""
    run, _ = stage2_run
    index, guided, copy = rerun_on_a_copy(run, tmp_path, "sample", "samples", "stage2.samples_per_class=3",
                                          "stage2.guidance=3", "stage2.choice_temperature=0", "stage2.sample_frame_steps=2")
    assert (index["guidance"], guided["guidance"], guided["choice_temperature"]) == (0.0, 3.0, 0.0)
    assert (index["sample_frame_steps"], guided["sample_frame_steps"]) == (0, 2)
    assert guided["seed"] == index["seed"]
    assert any(not np.array_equal(np.load(run / "samples" / a["npy"]), np.load(copy / "samples" / b["npy"]))
               for a, b in zip(index["videos"], guided["videos"])), "guidance and the order changed nothing"


def test_predict_writes_a_strip_per_test_video(stage2_run):
    run, outputs = stage2_run
    index = json.loads((run / "predictions" / "index.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    assert len(index["videos"]) == cfg["stage2"]["eval_videos"] == 16
    assert 0 < index["given_frames"] < cfg["data"]["frames"]
    for video in index["videos"]:
        assert video["png"] == f"{video['index']}.png"
        assert (run / "predictions" / video["png"]).read_bytes().startswith(PNG_SIGNATURE)
        assert math.isfinite(video["psnr_db"])
    assert set(index["summary"]) == set(PREDICTION_KINDS)
    assert "baseline_constant_velocity" in outputs["predict"]


def test_predict_takes_its_decoding_from_the_command_line_and_says_so(stage2_run, tmp_path):
    """stage2.predict_uncertain_per_step reaches predict's decoding; predictions/index.json says
    how its frames were drawn."""
    run, _ = stage2_run
    index, capped, _ = rerun_on_a_copy(run, tmp_path, "predict", "predictions", "stage2.predict_uncertain_per_step=1",
                                       "stage2.predict_frame_steps=1")
    assert (index["predict_uncertain_per_step"], index["predict_frame_steps"]) == (0, 2)  # smoke's
    assert (capped["predict_uncertain_per_step"], capped["predict_frame_steps"]) == (1, 1)
    assert len(capped["videos"]) == len(index["videos"])


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_evaluate_reports_generation_and_prediction(stage2_run):
    run, outputs = stage2_run
    report = json.loads((run / "eval" / "report.json").read_text())
    generation, prediction = report["generation"], report["prediction"]
    classes = smoke_classes(run)
    assert generation["videos"] == 2 * len(classes)  # smoke's samples_per_class
    # What made them, as sample and predict record it.
    sampled = json.loads((run / "samples" / "index.json").read_text())
    for key in ("checkpoint", "stage2_complete", "tokenizer_checkpoint", "seed", "steps", "temperature",
                "choice_temperature", "guidance"):
        assert generation[key] == prediction[key] == sampled[key], key
    for key in ("accuracy", "chance", "real_accuracy", "code_track_accuracy", "real_code_track_accuracy",
                "presence", "real_presence", "smoothness_px",
                "real_smoothness_px", "diversity", "real_diversity"):
        assert finite(generation[key]), key
    assert 0.0 <= generation["accuracy"] <= 1.0 and generation["chance"] == 1 / len(classes)
    # The classifier is evaluate's own: on the real test videos it scores what evaluate reports.
    assert generation["real_accuracy"] == pytest.approx(report["classifier"]["accuracy"])
    assert generation["real_code_track_accuracy"] == pytest.approx(report["classifier"]["track_accuracy"])
    # Generated videos are read by the judge of codes that reads the real ones better.
    trusted = report["goals"]["generated_class_accuracy"]
    better_on_real = max(("linear_probe", "accuracy"), ("code_track", "code_track_accuracy"),
                         key=lambda judge: (generation[f"real_{judge[1]}"], judge[0] == "linear_probe"))
    assert trusted["judge"] == better_on_real[0] and trusted["value"] == generation[better_on_real[1]]
    assert set(generation["per_class"]) == set(classes)
    # The ceiling: the real test videos through the tokenizer, judged as generated ones are.
    ceiling = generation["reconstructed"]
    assert all(0.0 <= ceiling[key] <= 1.0 for key in ("presence", "single_object", "track_accuracy"))
    assert finite(generation["frechet"]["reconstructed"]) and finite(ceiling["smoothness_px"])
    assert "through_tokenizer" in report["goals"]["generated_smoothness_ratio"]
    assert "real through the tokenizer" in outputs["evaluate"]
    assert prediction["videos"] == 16 and set(prediction["per_class"]) <= set(classes)
    for by_kind in (prediction["overall"], *prediction["per_class"].values()):
        assert set(by_kind) == set(PREDICTION_KINDS)
        for kind in PREDICTION_KINDS:
            assert set(by_kind[kind]) == SUMMARY_KEYS
            assert finite(by_kind[kind]["psnr_db"]) and finite(by_kind[kind]["centroid_error_px"])
    # predict and evaluate score the same videos with the same code and seed.
    predicted = json.loads((run / "predictions" / "index.json").read_text())["summary"]
    assert predicted == prediction["overall"]
    goals = report["goals"]
    assert goals["generated_class_accuracy"]["target"] == 0.9
    for name in ("", "_circular", "_helical", "_parabolic"):
        assert isinstance(goals[f"prediction_centroid_below_constant_velocity{name}"]["met"], bool)
    assert "generation:" in outputs["evaluate"] and "prediction of frames" in outputs["evaluate"]
    markdown = (run / "eval" / "report.md").read_text()
    assert "## Stage 2: class-conditional generation" in markdown and "## Stage 2: frame prediction" in markdown


# --- without a trained stage 2 --------------------------------------------------------------------


def test_without_stage2_sample_and_predict_exit_2_and_evaluate_notes_it(tmp_path):
    run = tmp_path / "run"
    trained = run_job("train", "--preset", "smoke", "--run-uri", str(run), "--set", "stage2.epochs=0", timeout=300)
    assert trained.returncode == 0, trained.stderr
    for mode in ("sample", "predict"):
        result = run_job(mode, "--preset", "smoke", "--run-uri", str(run))
        assert result.returncode == 2, result.stderr
        assert "no valid stage-2 checkpoint" in result.stderr and "train stage 2 first" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (run / "samples").exists() and not (run / "predictions").exists()
    result = run_job("evaluate", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["generation"]["skipped"].startswith("skipped: no trained stage 2")
    assert "generated_class_accuracy" not in report["goals"]
    assert "generation: skipped" in result.stdout


# --- an s3:// run from an empty cache ---------------------------------------------------------------


def test_sample_and_predict_on_a_bucket_run_from_an_empty_cache(smoke_baseline, s3, tmp_path):
    for path in sorted(smoke_baseline.rglob("*")):
        if path.is_file():
            s3.put(f"run/{path.relative_to(smoke_baseline).as_posix()}", path.read_bytes())
    env = job_env(**s3.env)
    for mode in ("sample", "predict"):
        cache = tmp_path / f"cache-{mode}"
        result = run_job(mode, "--preset", "smoke", "--run-uri", s3.uri(), "--cache-dir", str(cache), env=env,
                         timeout=300)
        assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    samples = json.loads(s3.get("run/samples/index.json"))
    for video in samples["videos"]:
        for kind in ("png", "gif", "npy"):
            assert s3.get(f"run/samples/{video[kind]}")
    predictions = json.loads(s3.get("run/predictions/index.json"))
    assert predictions["videos"] and all(s3.get(f"run/predictions/{v['png']}").startswith(PNG_SIGNATURE)
                                         for v in predictions["videos"])
