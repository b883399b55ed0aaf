"""The stage-2 part of ``evaluate`` (SPEC §15): how good the masked transformer's videos are.

``add_stage2_sections`` adds ``generation`` and ``prediction`` to the report, and their goals to
its goals block; a run without a trained stage 2 gets a note in both instead (evaluate does not
fail). Sampling settings (steps, temperature, samples per class, seed, eval_videos) are the
command line's ``stage2.*`` values, as for ``sample`` and ``predict``.

generation
    ``stage2.samples_per_class`` class-conditional videos per class (job.sampling), judged by
    evaluate's classifier trained on REAL videos: the linear probe on the LFQ bits of the
    tokenizer's codes of the train split (each video under the frame's symmetries), applied to
    the generated videos re-encoded by the same tokenizer. Beside it: chance, and the same probe
    on the real test videos. Object presence: the share of frames whose brightest pixel, rounded
    to 8 bits like the data, reaches the data's visibility threshold (job.data.VISIBLE_PIXEL).
    Trajectory smoothness: the mean Euclidean norm of the second difference over time of the
    per-frame object centroids (job.metrics.centroids, the model's foreground threshold), frames
    without a centroid left out. Diversity: the mean absolute pixel difference over all pairs of
    videos of one class. Each is given for the generated videos and for the real test videos.

prediction
    The first ``stage2.eval_videos`` test videos; the model gets the tokenizer's codes of the
    first ``predict_frames()`` latent frames (class "none") and generates the rest. Every frame
    after the given ones is scored against the truth by job.metrics.score_frames, the same code
    for the model and two baselines made from the TRUE given frames:
    ``baseline_copy_last`` repeats the last given frame; ``baseline_constant_velocity`` moves it
    along the velocity of the last two given frames' centroids, k frames ahead by k times that
    velocity, with a bilinear sub-pixel shift (grid_sample, black coming in at the edges); no
    velocity (0) where either centroid is missing.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F

from job.config import Config
from job.data import VISIBLE_PIXEL, VideoDataset
from job.evaluate import TestPass, fit_code_probe, formatted, scan_train_split
from job.goals import MAX_CENTROID_MISS_RATE, goal
from job.metrics import FrameScores, LinearProbe, centroids, code_bits, score_frames, summarise
from job.storage import RunStore

log = structlog.get_logger("job.evaluate")

MODEL = "model"
COPY_LAST = "baseline_copy_last"
CONSTANT_VELOCITY = "baseline_constant_velocity"
PREDICTION_KINDS = (MODEL, COPY_LAST, CONSTANT_VELOCITY)
# The classes whose motion a constant velocity does not follow: the model must beat it on each.
NONLINEAR_CLASSES = ("circular", "helical", "parabolic")
GENERATION_ACCURACY_TARGET = 0.9
ENCODE_BATCH = 64


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


# --- generation ------------------------------------------------------------------------------------


def presence(frames: torch.Tensor) -> float | None:
    """Share of frames (N, T, H, W) whose brightest pixel, in 8 bits, reaches VISIBLE_PIXEL."""
    if not frames.numel():
        return None
    brightest = torch.round(frames.float().amax(dim=(-2, -1)) * 255.0)
    return float((brightest >= VISIBLE_PIXEL).double().mean())


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
    real: torch.Tensor, real_labels: torch.Tensor, real_codes: torch.Tensor,
    probe: LinearProbe, classes: tuple[str, ...], codebook_bits: int, threshold: float,
) -> dict[str, Any]:
    """Frames (N, T, H, W) of generated and real (test) videos, their codes, and the probe
    trained on the codes of the train split."""
    def predict(codes: torch.Tensor) -> torch.Tensor:
        return probe.predict(code_bits(codes.to(probe.weight.device), codebook_bits)).cpu()

    recognised = predict(generated_codes) == generated_labels
    real_right = predict(real_codes) == real_labels
    per_class = {}
    for class_id, name in enumerate(classes):
        mine, theirs = generated_labels == class_id, real_labels == class_id
        per_class[name] = {
            "generated": int(mine.sum()),
            "accuracy": float(recognised[mine].double().mean()) if bool(mine.any()) else None,
            "real_accuracy": float(real_right[theirs].double().mean()) if bool(theirs.any()) else None,
            "presence": presence(generated[mine]), "real_presence": presence(real[theirs]),
            "smoothness_px": second_difference(generated[mine], threshold),
            "real_smoothness_px": second_difference(real[theirs], threshold),
            "diversity": diversity(generated[mine]), "real_diversity": diversity(real[theirs]),
        }
    def mean_of(key: str) -> float | None:
        values = [c[key] for c in per_class.values() if c[key] is not None]
        return float(np.mean(values)) if values else None

    return {
        "videos": len(generated),
        "accuracy": float(recognised.double().mean()) if len(generated) else None,
        "chance": 1.0 / len(classes),
        "real_accuracy": float(real_right.double().mean()) if len(real) else None,
        "real_videos": len(real),
        "presence": presence(generated), "real_presence": presence(real),
        "smoothness_px": second_difference(generated, threshold), "real_smoothness_px": second_difference(real, threshold),
        "diversity": mean_of("diversity"), "real_diversity": mean_of("real_diversity"),
        "per_class": per_class,
        "classifier": "evaluate's linear probe on the LFQ bits of the train split's codes (each video under the "
        "frame's symmetries); generated videos are re-encoded by the same tokenizer",
    }


# --- the report ------------------------------------------------------------------------------------


def add_stage2_sections(
    report: dict[str, Any], cfg: Config, store: RunStore, dataset: VideoDataset, probe: LinearProbe,
    test_pass: TestPass, device: torch.device,
) -> None:
    """Adds ``generation``, ``prediction`` and their goals to ``report``; a note in both when
    the run has no trained stage 2."""
    from job.generation import NoTrainedStage2, load_stage2
    from job.sampling import generate_class_videos, given_video_frames, predict_test_videos, prediction_indices
    from job.training.stage2 import encode_all

    try:
        model = load_stage2(cfg, store, device)
    except NoTrainedStage2 as exc:
        note = f"skipped: no trained stage 2 ({exc})"
        log.info("evaluate.stage2_skipped", reason=str(exc))
        report["generation"] = {"skipped": note}
        report["prediction"] = {"skipped": note}
        return
    started = time.monotonic()
    s2, run_cfg = cfg.stage2, model.cfg
    classes, threshold = run_cfg.data.classes, run_cfg.model.foreground_threshold
    tokenizer = model.tokenizer
    test_indices = dataset.split("test")
    if model.tokenizer_checkpoint.name == report["checkpoint"]:
        test_codes = test_pass.codes  # evaluate's probe is this tokenizer's
    else:  # stage 2 learned from another stage-1 checkpoint: its own tokenizer's codes, its own probe
        probe = fit_code_probe(scan_train_split(tokenizer, dataset, run_cfg, device), run_cfg, device)
        test_codes = encode_all(tokenizer, dataset, test_indices, run_cfg.train.batch_size, device)
    real, real_labels = dataset.get(test_indices)
    generated, generated_labels = generate_class_videos(model, s2.samples_per_class, s2.sample_steps, s2.temperature,
                                                        s2.sample_seed)
    generation = generation_section(
        generated, generated_labels, encode_frames(tokenizer, generated, device), real[:, 0], real_labels, test_codes,
        probe, classes, run_cfg.model.codebook_bits, threshold,
    )
    given = given_video_frames(model)
    predicted, truth, labels = predict_test_videos(model, dataset, prediction_indices(dataset, s2.eval_videos), cfg)
    prediction = prediction_section(predicted, truth, labels, classes, given, threshold)
    settings = {
        "checkpoint": model.checkpoint.name, "checkpoint_step": model.checkpoint.step, "complete": model.complete,
        "tokenizer_checkpoint": model.tokenizer_checkpoint.name, "steps": s2.sample_steps,
        "temperature": s2.temperature, "seed": s2.sample_seed,
    }
    report["generation"] = {**settings, "samples_per_class": s2.samples_per_class, **generation}
    report["prediction"] = {**settings, **prediction}
    report["goals"].update(stage2_goals(report["generation"], report["prediction"]))
    report["stage2_seconds"] = round(time.monotonic() - started, 2)


def _below_baseline(by_kind: dict[str, dict[str, Any]]) -> dict[str, Any]:
    model, baseline = by_kind[MODEL], by_kind[CONSTANT_VELOCITY]
    miss_rate = model["centroid_misses"] / model["object_frames"] if model["object_frames"] else None
    result = goal(model["centroid_error_px"], baseline["centroid_error_px"] or 0.0, "<")
    result["met"] = (
        model["centroid_error_px"] is not None and baseline["centroid_error_px"] is not None
        and model["centroid_error_px"] < baseline["centroid_error_px"]
        and miss_rate is not None and miss_rate <= MAX_CENTROID_MISS_RATE
    )
    result.update(baseline="constant velocity", miss_rate=miss_rate, max_miss_rate=MAX_CENTROID_MISS_RATE)
    return result


def stage2_goals(generation: dict[str, Any], prediction: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Generated videos recognised as their class; predicted centroids closer than the
    constant-velocity baseline's, overall and on each non-linear class (with at most the
    stage-1 goal's miss rate, so that missing the object does not pass for precision)."""
    goals = {"generated_class_accuracy": goal(generation["accuracy"], GENERATION_ACCURACY_TARGET, ">=")}
    goals["prediction_centroid_below_constant_velocity"] = _below_baseline(prediction["overall"])
    for name in NONLINEAR_CLASSES:
        if name in prediction["per_class"]:
            goals[f"prediction_centroid_below_constant_velocity_{name}"] = _below_baseline(prediction["per_class"][name])
    return goals


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line each for the stdout summary."""
    generation, prediction = report.get("generation"), report.get("prediction")
    if generation is None:
        return []
    if "skipped" in generation:
        return [f"generation: {generation['skipped']}", f"prediction: {prediction['skipped']}"]
    o = prediction["overall"]

    def kind(k: str) -> str:
        return f"{formatted(o[k]['psnr_db'], '{:.2f}')} dB / {formatted(o[k]['centroid_error_px'], '{:.3f}')} px"

    return [
        f"generation: {generation['videos']} videos recognised as their class {formatted(generation['accuracy'], '{:.1%}')} "
        f"(chance {generation['chance']:.1%}, real test videos {formatted(generation['real_accuracy'], '{:.1%}')}); "
        f"object present in {formatted(generation['presence'], '{:.1%}')} of frames "
        f"(real {formatted(generation['real_presence'], '{:.1%}')})",
        f"prediction of frames {prediction['given_frames']}+ on {prediction['videos']} test videos, PSNR / centroid "
        f"error: model {kind(MODEL)}, copy-last {kind(COPY_LAST)}, constant-velocity {kind(CONSTANT_VELOCITY)}",
    ]


def markdown(report: dict[str, Any]) -> str:
    generation, prediction = report.get("generation"), report.get("prediction")
    if generation is None:
        return ""
    if "skipped" in generation:
        return "\n".join(["## Stage 2: generation and prediction", "", generation["skipped"], ""])
    f = formatted
    lines = [
        "## Stage 2: class-conditional generation",
        "",
        f"Stage-2 {generation['checkpoint']} (step {generation['checkpoint_step']}, "
        f"{'finished' if generation['complete'] else 'NOT finished'}), tokenizer {generation['tokenizer_checkpoint']}; "
        f"{generation['samples_per_class']} videos per class, {generation['steps']} decoding steps, temperature "
        f"{generation['temperature']:g}, seed {generation['seed']}. Real: the {generation['real_videos']} test videos.",
        "",
        f"Recognised as their class: **{f(generation['accuracy'], '{:.1%}')}** (chance {generation['chance']:.1%}; the "
        f"same classifier on real test videos {f(generation['real_accuracy'], '{:.1%}')}). {generation['classifier']}.",
        "",
        "| class | recognised | real | presence | real | smoothness (px) | real | diversity | real |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {**generation["per_class"], "all": {
        "accuracy": generation["accuracy"], "real_accuracy": generation["real_accuracy"],
        "presence": generation["presence"], "real_presence": generation["real_presence"],
        "smoothness_px": generation["smoothness_px"], "real_smoothness_px": generation["real_smoothness_px"],
        "diversity": generation["diversity"], "real_diversity": generation["real_diversity"],
    }}
    for name, c in rows.items():
        lines.append(
            f"| {name} | {f(c['accuracy'], '{:.1%}')} | {f(c['real_accuracy'], '{:.1%}')} | {f(c['presence'], '{:.1%}')} | "
            f"{f(c['real_presence'], '{:.1%}')} | {f(c['smoothness_px'], '{:.3f}')} | {f(c['real_smoothness_px'], '{:.3f}')} | "
            f"{f(c['diversity'], '{:.4f}')} | {f(c['real_diversity'], '{:.4f}')} |"
        )
    lines += [
        "",
        "Presence: share of frames whose brightest pixel (8 bits) reaches the data's visibility threshold. Smoothness: "
        "mean |second difference| of the object centroids over time. Diversity: mean absolute pixel difference between "
        "two videos of a class, over all pairs. (\"all\": presence and smoothness over all videos, diversity the mean of "
        "the classes'.)",
        "",
        "## Stage 2: frame prediction",
        "",
        f"{prediction['videos']} test videos; frames 0-{prediction['given_frames'] - 1} given (as the tokenizer's codes), "
        f"frames {prediction['given_frames']}+ predicted. Baselines from the true given frames, scored by the same code: "
        "copy-last repeats the last given frame; constant-velocity moves it along its centroid velocity over the last two "
        "given frames (bilinear sub-pixel shift).",
        "",
    ]
    for title, by_kind in (("all classes", prediction["overall"]), *prediction["per_class"].items()):
        frames = [p["frame"] for p in by_kind[MODEL]["per_frame"]]
        lines += [
            f"### {title}",
            "",
            "| | " + " | ".join(f"frame {t}" for t in frames) + " | mean | misses |",
            "|---" * (len(frames) + 3) + "|",
        ]
        for k in PREDICTION_KINDS:
            s = by_kind[k]
            lines.append(f"| {k} PSNR (dB) | " + " | ".join(f(p["psnr_db"], "{:.2f}") for p in s["per_frame"])
                         + f" | {f(s['psnr_db'], '{:.2f}')} | |")
            lines.append(f"| {k} centroid error (px) | "
                         + " | ".join(f(p["centroid_error_px"], "{:.3f}") for p in s["per_frame"])
                         + f" | {f(s['centroid_error_px'], '{:.3f}')} | {s['centroid_misses']} / {s['object_frames']} |")
        lines.append("")
    return "\n".join(lines)
