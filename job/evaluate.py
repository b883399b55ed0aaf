"""``evaluate`` (SPEC §11): how good the run's best model is, on the test split, next to baselines.

1. Load the best checkpoint (verified against its manifest); the model is rebuilt from the
   checkpoint's own config, so a wrong ``--preset`` cannot mismatch it.
2. One pass over the train split: the per-pixel mean frame (a baseline) and the codes the
   classifier learns from: those of every train video under each symmetry of the frame that
   the data are drawn invariant under (``symmetric_views``). The test split is never trained on.
3. One pass over the test split: encode -> decode, and the same per-frame metrics (job.metrics)
   for the model, an all-black frame and the mean frame, overall and per class.
4. Codebook usage on the test codes; a linear probe on the LFQ bits of the train codes, scored
   on the test codes; side-by-side PNGs per class.
5. eval/report.json, eval/report.md, a summary on stdout. Goals are reported, never asserted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from job.checkpoint import Checkpoint, CheckpointError, CheckpointReader
from job.config import MATH_SECTIONS, Config, ConfigError, config_from_dict, diff_keys, set_value
from job.data import VideoDataset, prepare_dataset
from job.device import pick_device
from job.goals import BLACK, MODEL, goals, ordered_goals
from job.metrics import (
    PSNR_CAP_DB, FrameScores, LinearProbe, code_bits, confusion_matrix, fit_linear_probe, score_frames, ssim_window,
    summarise,
)
from job.model import VideoTokenizer, codebook_stats, trained_tokenizer
from job.monitoring.lifecycle import stop_point
from job.monitoring.progress import utc_now
from job.plots import reconstruction_grid_png
from job.storage import Layout, RunStore

log = structlog.get_logger("job.evaluate")

REPORT_JSON = f"{Layout.eval}/report.json"
REPORT_MD = f"{Layout.eval}/report.md"
EXAMPLES_PER_CLASS = 3
# What each set of frames is scored as; the baselines go through the same metric code as the model.
MEAN_FRAME = "baseline_mean_frame"
KINDS = (MODEL, BLACK, MEAN_FRAME)
KIND_TITLES = {MODEL: "model", BLACK: "all-black", MEAN_FRAME: "mean-frame"}
class NothingToEvaluate(ConfigError):
    """The run folder holds no checkpoint that passes verification (exit 2: wrong run URI)."""


def run_evaluate(cfg: Config, store: RunStore) -> dict[str, Any]:
    started = time.monotonic()
    checkpoint, choice = load_best_checkpoint(CheckpointReader(store))
    run_cfg = evaluation_config(checkpoint, cfg)
    device = pick_device(run_cfg)
    model = trained_tokenizer(checkpoint.model, run_cfg.model, run_cfg.data, device)
    dataset = prepare_dataset(run_cfg, store)
    log.info("evaluate.start", checkpoint=checkpoint.name, choice=choice, device=str(device))

    train_pass = scan_train_split(model, dataset, run_cfg, device)
    test_pass = score_test_split(model, dataset, run_cfg, device, train_pass.mean_frame)
    probe = fit_code_probe(train_pass, run_cfg, device)
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
        },
        "classifier": classify_codes(probe, train_pass, test_pass, run_cfg),
        "images": write_example_images(store, model, dataset, test_pass, run_cfg, device, checkpoint.name),
    }
    report["goals"] = goals(report)
    from job.evaluate_stage2 import add_stage2_sections, markdown as stage2_markdown

    add_stage2_sections(report, cfg, store, dataset, probe, test_pass, device)  # generation, prediction, their goals
    report["seconds"] = round(time.monotonic() - started, 2)
    report["created_at"] = utc_now()
    store.write_json(REPORT_JSON, report)
    store.write_text(REPORT_MD, report_markdown(report) + stage2_markdown(report))
    model_metrics = report["metrics"][MODEL]
    log.info(
        "evaluate.done", checkpoint=checkpoint.name, psnr_db=model_metrics["psnr_db"],
        centroid_error_px=model_metrics["centroid_error_px"], accuracy=report["classifier"]["accuracy"],
        goals_met=sum(g["met"] for g in report["goals"].values()), seconds=report["seconds"],
    )
    print(summary_text(report, store.uri), flush=True)
    return report


# --- model and data -------------------------------------------------------------------------


def load_best_checkpoint(checkpointer: CheckpointReader) -> tuple[Checkpoint, str]:
    """The best checkpoint by validation loss, as the newest valid checkpoint records it; the
    newest valid one itself when the best is not recorded or fails verification. Returns it with
    a sentence saying which was used and why."""
    newest = checkpointer.load_newest_valid()
    if newest is None:
        raise NothingToEvaluate(f"no checkpoint in {checkpointer.store.uri} passes verification; nothing to evaluate")
    best = (newest.state.get("best") or {}).get("checkpoint")
    if best is None:
        return newest, f"newest valid checkpoint {newest.name} (the run records no best)"
    if best == newest.name:
        return newest, f"best checkpoint by validation loss ({best}, also the newest)"
    try:
        return checkpointer.load(best), f"best checkpoint by validation loss ({best})"
    except CheckpointError as exc:
        log.warning("evaluate.best_unusable", checkpoint=best, reason=str(exc), using=newest.name)
        return newest, f"newest valid checkpoint {newest.name}: the best, {best}, fails verification ({exc})"


def evaluation_config(checkpoint: Checkpoint, cfg: Config) -> Config:
    """The run's own config, from the checkpoint, with this machine's choices from ``cfg``: the
    device, the thread count and, when given, where the data lives."""
    run_cfg = config_from_dict(checkpoint.state["config"])
    differing = diff_keys(checkpoint.state["config"], cfg.to_dict(), MATH_SECTIONS)
    if differing:
        log.info("evaluate.using_run_config", differing_keys=differing)
    set_value(run_cfg, "train.device", cfg.train.device)
    set_value(run_cfg, "train.threads", cfg.train.threads)
    if cfg.data.uri:
        set_value(run_cfg, "data.uri", cfg.data.uri)
    return run_cfg


def batches(dataset: VideoDataset, indices: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(indices), batch_size):
        stop_point("evaluating")  # the report is written only at the end
        yield dataset.get(indices[start : start + batch_size])


def reconstruct(model: VideoTokenizer, videos: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, reconstruction (N, T, H, W)) through the tokenizer's public encode -> decode path."""
    codes = model.encode(videos.to(device))
    return codes, model.decode(codes)[:, 0].float()


def symmetric_views(videos: torch.Tensor) -> list[torch.Tensor]:
    """``videos`` (..., H, W) under each symmetry of the frame: the 8 rotations by quarter turns
    and mirror images of a square frame, the 4 of a rectangle (identity, two mirrors, half turn).

    The data are drawn invariant under these (job.synthetic: the path spins uniformly about the
    optical axis, tilts and shifts are symmetric about 0, the blob is round, the principal point
    is the frame's centre), so each view is another sample of the same class. The classifier
    learns from all of them: a linear probe on codes at fixed positions needs a template for
    every orientation, and 8x the train videos cover them (docs/quality.md)."""
    turns = (0, 1, 2, 3) if videos.shape[-1] == videos.shape[-2] else (0, 2)
    rotated = [torch.rot90(videos, k, dims=(-2, -1)) for k in turns]
    return rotated + [view.flip(-1) for view in rotated]


@dataclass
class TrainPass:
    mean_frame: torch.Tensor  # (T, H, W): the per-pixel mean over the train split
    codes: torch.Tensor  # (N * views, t, h, w): every train video under each of symmetric_views
    labels: torch.Tensor  # (N * views,)
    videos: int  # N
    views: int


@torch.no_grad()
def scan_train_split(model: VideoTokenizer, dataset: VideoDataset, cfg: Config, device: torch.device) -> TrainPass:
    indices = dataset.split("train")
    total = torch.zeros(model.input_shape, dtype=torch.float64)
    codes, labels = [], []
    for videos, batch_labels in batches(dataset, indices, cfg.train.batch_size):
        total += videos[:, 0].sum(dim=0, dtype=torch.float64)
        views = symmetric_views(videos)
        codes += [model.encode(view.to(device)).cpu() for view in views]
        labels += [batch_labels] * len(views)
    return TrainPass((total / len(indices)).float(), torch.cat(codes), torch.cat(labels), len(indices), len(views))


def fit_code_probe(train_pass: TrainPass, cfg: Config, device: torch.device) -> LinearProbe:
    """The code classifier: a linear probe on the LFQ bits of the train pass's codes, fitted on
    ``device`` (8 views of 8,000 videos are GBs of features on the GPU preset)."""
    features = code_bits(train_pass.codes.to(device), cfg.model.codebook_bits)
    return fit_linear_probe(features, train_pass.labels.to(device), len(cfg.data.classes))


@dataclass
class TestPass:
    scores: dict[str, FrameScores]  # by kind (model and baselines)
    codes: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray  # dataset indices of the test samples, in order


@torch.no_grad()
def score_test_split(
    model: VideoTokenizer, dataset: VideoDataset, cfg: Config, device: torch.device, mean_frame: torch.Tensor
) -> TestPass:
    indices = dataset.split("test")
    threshold = cfg.model.foreground_threshold
    mean_frame = mean_frame.to(device)
    scores: dict[str, list[FrameScores]] = {kind: [] for kind in KINDS}
    codes, labels = [], []
    for videos, batch_labels in batches(dataset, indices, cfg.train.batch_size):
        batch_codes, recon = reconstruct(model, videos, device)
        target = videos[:, 0].to(device)
        candidates = {MODEL: recon, BLACK: torch.zeros_like(target), MEAN_FRAME: mean_frame.expand_as(target)}
        for kind, candidate in candidates.items():
            scores[kind].append(score_frames(candidate, target, threshold).cpu())
        codes.append(batch_codes.cpu())
        labels.append(batch_labels)
    return TestPass({k: FrameScores.cat(v) for k, v in scores.items()}, torch.cat(codes), torch.cat(labels), indices)


# --- the parts of the report ------------------------------------------------------------------


def per_class_metrics(test_pass: TestPass, classes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    result = {}
    for class_id, name in enumerate(classes):
        samples = test_pass.labels == class_id
        result[name] = {"samples": int(samples.sum())}
        result[name].update({kind: summarise(test_pass.scores[kind].select(samples)) for kind in KINDS})
    return result


def classify_codes(probe: LinearProbe, train_pass: TrainPass, test_pass: TestPass, cfg: Config) -> dict[str, Any]:
    """Can the codes tell the trajectories apart? The code probe, scored on the test split's codes."""
    classes = list(cfg.data.classes)
    bits = cfg.model.codebook_bits
    predicted = probe.predict(code_bits(test_pass.codes.to(probe.weight.device), bits)).cpu()
    confusion = confusion_matrix(test_pass.labels, predicted, len(classes))
    t, h, w = test_pass.codes.shape[1:]
    return {
        "accuracy": float((predicted == test_pass.labels).double().mean()),
        "chance": 1.0 / len(classes),
        "confusion_matrix": confusion.tolist(),
        "classes": classes,
        "features": f"LFQ code bits as +-1 at every latent position, standardised: {t}x{h}x{w} positions x {bits} bits"
        f" = {t * h * w * bits} features",
        "probe": "multinomial logistic regression, L2 1e-2, full-batch L-BFGS from zero weights (deterministic), "
        f"trained on each train video under the frame's {train_pass.views} symmetries (rotations, mirror images)",
        "train_samples": train_pass.videos,
        "train_views": train_pass.views,
        "test_samples": len(test_pass.labels),
    }


@torch.no_grad()
def write_example_images(
    store: RunStore, model: VideoTokenizer, dataset: VideoDataset, test_pass: TestPass, cfg: Config,
    device: torch.device, checkpoint_name: str,
) -> dict[str, str]:
    """eval/<class>.png: the first few test samples of each class, original | reconstruction | error."""
    images = {}
    for class_id, name in enumerate(cfg.data.classes):
        chosen = test_pass.indices[(test_pass.labels == class_id).numpy()][:EXAMPLES_PER_CLASS]
        if not len(chosen):
            continue
        videos, _ = dataset.get(chosen)
        _, recon = reconstruct(model, videos, device)
        png = reconstruction_grid_png(
            videos[:, 0].numpy(), recon.cpu().numpy(), [f"{name} #{i}" for i in chosen],
            f"{name}, test split, {checkpoint_name}: original | reconstruction | error",
        )
        images[name] = f"{Layout.eval}/{name}.png"
        store.write_bytes(images[name], png)
    return images


# --- presentation -------------------------------------------------------------------------------

# (key in a metrics summary, row title, how to format it)
METRIC_ROWS = (
    ("psnr_db", "PSNR (dB, mean over frames)", "{:.2f}"),
    ("psnr_of_mean_mse_db", "PSNR of the mean MSE (dB)", "{:.2f}"),
    ("mse", "MSE", "{:.3g}"),
    ("ssim", "SSIM (per frame)", "{:.4f}"),
    ("foreground_psnr_db", "foreground PSNR (dB)", "{:.2f}"),
    ("centroid_error_px", "centroid error (px)", "{:.3f}"),
    ("centroid_miss_rate", "centroid miss rate", "{:.1%}"),
)


def formatted(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def metrics_table(by_kind: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| metric | " + " | ".join(KIND_TITLES[k] for k in KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    for key, title, pattern in METRIC_ROWS:
        lines.append(f"| {title} | " + " | ".join(formatted(by_kind[k][key], pattern) for k in KINDS) + " |")
    return lines


def confusion_table(classifier: dict[str, Any]) -> list[str]:
    classes = classifier["classes"]
    lines = ["| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, row in zip(classes, classifier["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(count) for count in row) + " |")
    return lines


def goals_table(report_goals: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| goal | value | target | met |", "|---|---|---|---|"]
    for name, g in ordered_goals(report_goals):
        target = f"{g['comparison']} {g['target']:g}"
        if "max_miss_rate" in g:
            target += f", miss rate <= {g['max_miss_rate']:.0%} (now {formatted(g['miss_rate'], '{:.1%}')})"
        if "baseline_black" in g:
            target += f", above all-black ({formatted(g['baseline_black'], '{:.3f}')})"
        lines.append(f"| {name} | {formatted(g['value'], '{:.3f}')} | {target} | {'yes' if g['met'] else 'no'} |")
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    frames, height, width = report["video_shape"]
    classifier, codebook = report["classifier"], report["codebook"]
    lines = [
        f"# Evaluation of {report['checkpoint']} (step {report['checkpoint_step']})",
        "",
        f"Model: {report['checkpoint_choice']}. Data: the test split, never trained on: {report['samples']} videos of "
        f"{frames} frames of {height}x{width}. Evaluated on {report['device']} in {report['seconds']:.1f} s, "
        f"{report['created_at']}.",
        "",
        "Every number stands next to two baselines scored by the same code: an all-black frame, and the per-pixel "
        "mean frame of the train split. On frames that are >95% black, a PSNR close to the all-black one means the "
        "model has not learnt the object.",
        "",
        "## Reconstruction, all test frames",
        "",
        *metrics_table(report["metrics"]),
        "",
        "## Per class",
    ]
    for name, by_kind in report["per_class"].items():
        lines += ["", f"### {name} ({by_kind['samples']} test videos)", "", *metrics_table(by_kind)]
        if name in report["images"]:
            # report.md lives in eval/ beside the images: links relative to it work in a bucket and a checkout.
            lines += ["", f"![{name}]({name}.png)"]
    lines += [
        "",
        "## Codebook (test codes)",
        "",
        f"Usage {codebook['usage']:.1%} of {codebook['codebook_size']} codes; perplexity {codebook['perplexity']:.1f} "
        f"over {codebook['tokens']} tokens.",
        "",
        "## Can the codes classify the trajectories?",
        "",
        f"Test accuracy **{classifier['accuracy']:.1%}** (chance {classifier['chance']:.1%}); "
        f"{classifier['probe']}, trained on the codes of {classifier['train_samples']} train videos. "
        f"Features: {classifier['features']}.",
        "",
        *confusion_table(classifier),
        "",
        "## Goals (issue #12; reported, not asserted)",
        "",
        *goals_table(report["goals"]),
        "",
        "## Definitions",
        "",
        f"- PSNR per frame with data range 1, averaged over frames; MSE floored at 1e-10, so a perfect frame scores "
        f"{PSNR_CAP_DB:.0f} dB. 'PSNR of the mean MSE' is 10 log10(1 / MSE over all frames).",
        f"- SSIM per 2D frame (torchmetrics), Gaussian window {ssim_window(height, width)[0]} px; not a 3D volume.",
        "- Foreground: pixels of the original brighter than the model's foreground_threshold; foreground PSNR is "
        "per frame, over frames that have such pixels.",
        "- Centroid: intensity-weighted mean position of the pixels above that threshold. The error is the distance "
        "between the original's and the reconstruction's, over frames whose original shows the object; a "
        "reconstruction without such pixels is a miss (miss rate), not an error. The all-black baseline misses all.",
        "",
    ]
    return "\n".join(lines)


# The rows of the summary that evaluate prints last (and `make demo` prints again at its end).
SUMMARY_ROWS = (
    ("psnr_db", "PSNR (dB)", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("foreground_psnr_db", "foreground PSNR (dB)", "{:.2f}"),
    ("centroid_error_px", "centroid error (px)", "{:.3f}"),
    ("centroid_miss_rate", "centroid miss rate", "{:.1%}"),
)


def text_table(rows: list[list[str]]) -> list[str]:
    """Rows of cells as left-aligned columns for a terminal; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def summary_text(report: dict[str, Any], uri: str) -> str:
    """The model beside both baselines, then every goal: the first thing to read after a run."""
    from job.evaluate_stage2 import summary_lines as stage2_summary_lines

    m = report["metrics"]
    metric_rows = [["", *(KIND_TITLES[kind] for kind in KINDS)]]
    for key, title, pattern in SUMMARY_ROWS:
        metric_rows.append([title, *(formatted(m[kind][key], pattern) for kind in KINDS)])
    goal_rows = [["goal", "value", "target", "met"]]
    for name, g in ordered_goals(report["goals"]):
        goal_rows.append([name, formatted(g["value"], "{:.3f}"), f"{g['comparison']} {g['target']:g}",
                          "yes" if g["met"] else "NO"])
    classifier, codebook = report["classifier"], report["codebook"]
    met = [name for name, g in report["goals"].items() if g["met"]]
    return "\n".join([
        f"evaluate: {report['checkpoint']} on {report['samples']} test videos, {report['seconds']:.1f} s",
        *text_table(metric_rows),
        f"codebook usage {codebook['usage']:.1%} of {codebook['codebook_size']} codes, "
        f"perplexity {codebook['perplexity']:.1f}",
        f"code classifier accuracy {classifier['accuracy']:.1%} (chance {classifier['chance']:.1%})",
        *stage2_summary_lines(report),
        *text_table(goal_rows),
        f"goals met: {len(met)}/{len(report['goals'])}",
        f"report: {uri.rstrip('/')}/{REPORT_MD}",
    ])


def print_summary(uri: str) -> None:
    """Print the summary of the run's last evaluation again (``make demo`` ends with it)."""
    store = RunStore(uri, read_only=True)
    report = store.read_json(REPORT_JSON)
    if report is None:
        raise SystemExit(f"no {REPORT_JSON} in {uri}: run `python -m job evaluate` first")
    print(summary_text(report, store.uri), flush=True)
