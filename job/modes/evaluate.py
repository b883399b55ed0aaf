"""``evaluate`` (docs/evaluation.md): how good the run's best model is, on the test split, next to baselines.

1. Load the best checkpoint (verified against its manifest); the model is rebuilt from the
   checkpoint's own config, so a wrong ``--preset`` cannot mismatch it.
2. One pass over the train split: the per-pixel mean frame (a baseline) and the codes the
   judges of codes learn from. The test split is never trained on.
3. One pass over the test split: encode -> decode, and the same per-frame metrics (job.eval.frame_metrics)
   for the model, an all-black frame and the mean frame, overall and per class.
4. Codebook usage on the test codes; the judges of codes (a linear probe on the LFQ bits, the
   code-track judge) fitted on the train codes, scored on the test codes; side-by-side PNGs per class.
5. eval/report.json, eval/report.md, a summary on stdout. Goals are reported, never asserted.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
import torch

from job.checkpoints.reader import CheckpointReader
from job.config import Config
from job.data.dataset import VideoDataset, prepare_dataset
from job.eval.frame_metrics import MODEL, summarise
from job.eval.generation import encode_frames, generation_section
from job.eval.goals import generation_goals, goals
from job.eval.pixel_judges import PixelJudges
from job.eval.prediction import prediction_section
from job.eval.code_judges import CodeJudges
from job.eval.reconstruction import (
    KINDS,
    TestPass,
    classify_codes,
    fit_code_classifier,
    per_class_metrics,
    scan_train_split,
    score_test_split,
    write_example_images,
)
from job.eval.report import generation_markdown, report_markdown, summary_text
from job.eval.tokens import black_video_codes, code_statistics
from job.exits import EXIT_OK
from job.inference.load import NoTrainedGenerator, evaluation_config, load_best_checkpoint, load_generator
from job.inference.videos import (
    decode,
    encode_all,
    generate_class_videos,
    given_video_frames,
    predict_test_videos,
    prediction_indices,
    prediction_settings,
)
from job.models.tokenizer import codebook_stats, trained_tokenizer
from job.modes.common import open_run
from job.monitoring.progress import utc_now
from job.runtime.device import pick_device
from job.storage import Layout, RunStore

log = structlog.get_logger("job.evaluate")

JUDGE_TRAIN_VIDEOS = 2048  # real train videos the pixel judges learn from (all of them on small)


def run(cfg: Config, store: RunStore) -> dict[str, Any]:
    started = time.monotonic()
    checkpoint, choice = load_best_checkpoint(CheckpointReader(store))
    run_cfg = evaluation_config(checkpoint, cfg)
    device = pick_device(run_cfg)
    model = trained_tokenizer(checkpoint.model, run_cfg.model, run_cfg.data, device)
    dataset = prepare_dataset(run_cfg, store)
    log.info("evaluate.start", checkpoint=checkpoint.name, choice=choice, device=str(device))

    train_pass = scan_train_split(model, dataset, run_cfg, device)
    test_pass = score_test_split(model, dataset, run_cfg, device, train_pass.mean_frame)
    code_judges = fit_code_classifier(train_pass, run_cfg, device)
    report = {
        "checkpoint": checkpoint.name,
        "checkpoint_step": checkpoint.manifest["step"],
        "checkpoint_choice": choice,
        "split": "test",
        "samples": len(test_pass.labels),
        "video_shape": list(model.input_shape),
        "device": str(device),
        "metrics": {kind: summarise(test_pass.scores[kind]) for kind in KINDS},
        "per_class": per_class_metrics(test_pass, run_cfg.data.classes),
        "codebook": {
            **codebook_stats(test_pass.codes, model.codebook_size),
            "codebook_size": model.codebook_size,
            "tokens": test_pass.codes.numel(),
            **code_statistics(test_pass.codes, test_pass.objects, model.codebook_size),
            "black_video_codes": black_video_codes(model, device),
        },
        "classifier": classify_codes(code_judges, train_pass, test_pass, run_cfg),
        "images": write_example_images(store, model, dataset, test_pass, run_cfg, device, checkpoint.name),
    }
    report["goals"] = goals(report)
    add_generation_sections(report, cfg, store, dataset, code_judges, test_pass, device)  # generation, prediction, their goals
    report["seconds"] = round(time.monotonic() - started, 2)
    report["created_at"] = utc_now()
    store.write_json(Layout.eval_report, report)
    store.write_text(Layout.eval_markdown, report_markdown(report) + generation_markdown(report))
    model_metrics = report["metrics"][MODEL]
    log.info(
        "evaluate.done", checkpoint=checkpoint.name, psnr_db=model_metrics["psnr_db"],
        centroid_error_px=model_metrics["centroid_error_px"], accuracy=report["classifier"]["accuracy"],
        goals_met=sum(g["met"] for g in report["goals"].values()), seconds=report["seconds"],
    )
    print(summary_text(report, store.uri), flush=True)
    return report


def add_generation_sections(
    report: dict[str, Any], cfg: Config, store: RunStore, dataset: VideoDataset, code_judges: CodeJudges,
    test_pass: TestPass, device: torch.device,
) -> None:
    """Adds ``generation``, ``prediction`` and their goals to ``report``; a note in both when
    the run has no trained stage 2."""
    try:
        model = load_generator(cfg, store, device)
    except NoTrainedGenerator as exc:
        note = f"skipped: no trained stage 2 ({exc})"
        log.info("evaluate.stage2_skipped", reason=str(exc))
        report["generation"] = {"skipped": note}
        report["prediction"] = {"skipped": note}
        return
    started = time.monotonic()
    run_cfg = model.cfg
    s2 = run_cfg.stage2
    classes, threshold = run_cfg.data.classes, run_cfg.model.foreground_threshold
    tokenizer = model.tokenizer
    test_indices = dataset.split("test")
    if model.tokenizer_checkpoint.name == report["checkpoint"]:
        test_codes = test_pass.codes  # evaluate's judges of codes are this tokenizer's
    else:  # stage 2 learned from another stage-1 checkpoint: its own tokenizer's codes, its own judges
        code_judges = fit_code_classifier(scan_train_split(tokenizer, dataset, run_cfg, device), run_cfg, device)
        test_codes = encode_all(tokenizer, dataset, test_indices, run_cfg.train.batch_size, device)
    real, real_labels = dataset.get(test_indices)
    generated, generated_labels = generate_class_videos(model)
    train_videos, train_labels = dataset.get(dataset.split("train")[:JUDGE_TRAIN_VIDEOS])
    judges = PixelJudges.fit(train_videos[:, 0], train_labels, len(classes), threshold)
    reference = dataset.get(dataset.split("val")[: len(generated)])[0][:, 0]
    generation = generation_section(
        generated, generated_labels, encode_frames(tokenizer, generated, device), real[:, 0], real_labels, test_codes,
        decode(model, test_codes), code_judges, judges, reference, classes, threshold,
    )
    given = given_video_frames(model)
    predicted, truth, labels = predict_test_videos(model, dataset, prediction_indices(dataset, s2.eval_videos))
    prediction = prediction_section(predicted, truth, labels, classes, given, threshold)
    settings = model.settings()
    # What the headline masked-token accuracy hides, from stage 2's last validation (metrics.jsonl).
    history = model.checkpoint.state["metrics"]
    health = {key: value for key, value in (history[-1] if history else {}).items() if key.startswith("val_")}
    report["generation"] = {**settings, "samples_per_class": s2.samples_per_class, "stage2_validation": health,
                            **generation}
    report["prediction"] = {**settings, **prediction_settings(model), **prediction}
    report["goals"].update(generation_goals(report["generation"], report["prediction"]))
    report["stage2_seconds"] = round(time.monotonic() - started, 2)


def main(cfg: Config, run_uri: str, cache_dir: str | None) -> int:
    open_run(run, cfg, run_uri, cache_dir)
    return EXIT_OK
