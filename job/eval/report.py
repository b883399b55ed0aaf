"""The evaluation report for a person: eval/report.md's tables and images, and the summary on
stdout (the demo ends with it)."""

from __future__ import annotations

from typing import Any

from job.eval.frame_metrics import BLACK, CONSTANT_VELOCITY, COPY_LAST, MEAN_FRAME, MODEL, PSNR_CAP_DB, ssim_window
from job.eval.goals import ordered_goals
from job.eval.prediction import PREDICTION_KINDS
from job.eval.reconstruction import KINDS
from job.storage import Layout, RunStore

KIND_TITLES = {MODEL: "model", BLACK: "all-black", MEAN_FRAME: "mean-frame"}


def formatted(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def metrics_table(by_kind: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| metric | " + " | ".join(KIND_TITLES[k] for k in KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    for key, title, pattern in METRIC_ROWS:
        lines.append(f"| {title} | " + " | ".join(formatted(by_kind[k].get(key), pattern) for k in KINDS) + " |")
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
        if "bounds" in g:
            target = f"within {g['bounds'][0]:g}-{g['bounds'][1]:g} in every class"
        if "through_tokenizer" in g:
            target += f" (the real videos through the tokenizer: {formatted(g['through_tokenizer']['value'], '{:.3f}')})"
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
        f"over {codebook['tokens']} tokens. {code_meaning(codebook)}",
        "",
        "## Can the codes classify the trajectories?",
        "",
        f"Test accuracy **{classifier['accuracy']:.1%}** (chance {classifier['chance']:.1%}); "
        f"{classifier['probe']}, trained on the codes of {classifier['train_samples']} train videos. "
        f"Features: {classifier['features']}.",
        "",
        f"Code-track judge: test accuracy **{classifier['track_accuracy']:.1%}**; {classifier['track_judge']}.",
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


def text_table(rows: list[list[str]]) -> list[str]:
    """Rows of cells as left-aligned columns for a terminal; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def summary_text(report: dict[str, Any], uri: str) -> str:
    """The model beside both baselines, then every goal: the first thing to read after a run."""

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
        f"perplexity {codebook['perplexity']:.1f}; {code_meaning(codebook)}",
        f"code classifier accuracy {classifier['accuracy']:.1%} (chance {classifier['chance']:.1%})"
        + (f", code-track judge {track:.1%}" if (track := classifier.get("track_accuracy")) is not None else ""),
        *generation_summary_lines(report),
        *text_table(goal_rows),
        f"goals met: {len(met)}/{len(report['goals'])}",
        f"report: {uri.rstrip('/')}/{Layout.eval_markdown}",
    ])


def print_summary(uri: str) -> None:
    """Print the summary of the run's last evaluation again (``make demo`` ends with it)."""
    store = RunStore(uri, read_only=True)
    report = store.read_json(Layout.eval_report)
    if report is None:
        raise SystemExit(f"no {Layout.eval_report} in {uri}: run `python -m job evaluate` first")
    print(summary_text(report, store.uri), flush=True)


def generation_summary_lines(report: dict[str, Any]) -> list[str]:
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
        f"generation: {generation['videos']} videos recognised as their class {code_judge_readings(generation)} "
        f"(chance {generation['chance']:.1%}); "
        f"object present in {formatted(generation['presence'], '{:.1%}')} of frames "
        f"(real {formatted(generation['real_presence'], '{:.1%}')})",
        *pixel_judge_lines(generation),
        f"prediction of frames {prediction['given_frames']}+ on {prediction['videos']} test videos, PSNR / centroid "
        f"error: model {kind(MODEL)}, copy-last {kind(COPY_LAST)}, constant-velocity {kind(CONSTANT_VELOCITY)}",
        *stage2_health_lines(generation.get("stage2_validation") or {}),
    ]


def code_judge_readings(generation: dict[str, Any]) -> str:
    """What each judge of codes reads of the generated videos, the real test videos beside it (a report
    from before the code-track judge has the probe's alone)."""
    f = formatted
    readings = f"by the code probe {f(generation['accuracy'], '{:.1%}')} (real {f(generation['real_accuracy'], '{:.1%}')})"
    if "code_track_accuracy" in generation:
        readings += (f", by the code-track judge {f(generation['code_track_accuracy'], '{:.1%}')} "
                     f"(real {f(generation['real_code_track_accuracy'], '{:.1%}')})")
    return readings


def pixel_judge_lines(generation: dict[str, Any]) -> list[str]:
    """The judges that look at pixels (reports older than them lack these numbers)."""
    if "track_accuracy" not in generation:
        return []
    frechet, ceiling = generation["frechet"], generation.get("reconstructed", {})
    return [
        f"by their tracks recognised as their class {formatted(generation['track_accuracy'], '{:.1%}')} (real "
        f"{formatted(generation['real_track_accuracy'], '{:.1%}')}, real through the tokenizer "
        f"{formatted(ceiling.get('track_accuracy'), '{:.1%}')}); exactly one object in "
        f"{formatted(generation['single_object'], '{:.1%}')} of frames with one (real "
        f"{formatted(generation['real_single_object'], '{:.1%}')}, through the tokenizer "
        f"{formatted(ceiling.get('single_object'), '{:.1%}')}); Fréchet distance to real test videos "
        f"{formatted(frechet['generated'], '{:.3g}')} (other real videos {formatted(frechet['real_reference'], '{:.3g}')}, "
        f"real through the tokenizer {formatted(frechet.get('reconstructed'), '{:.3g}')}, "
        f"all-black {formatted(frechet['all_black'], '{:.3g}')})"
    ]


def stage2_health_lines(health: dict[str, Any]) -> list[str]:
    """Stage 2's last validation: what its masked-token accuracy is made of."""
    if "val_object_accuracy" not in health:
        return []
    return [
        f"stage 2 (last validation): masked-token accuracy {formatted(health['val_accuracy'], '{:.1%}')}, on the "
        f"object's tokens {formatted(health['val_object_accuracy'], '{:.1%}')}; "
        f"{formatted(health['val_gain_over_lookup'], '{:+.1%}')} over a per-position lookup table "
        f"({formatted(health['val_lookup_accuracy'], '{:.1%}')}); the true class against a wrong one lowers the loss "
        f"by {formatted(health['val_class_effect_nats'], '{:.3f}')} nats, on the object's tokens by "
        f"{formatted(health.get('val_class_effect_object_nats'), '{:.3f}')} (their loss "
        f"{formatted(health.get('val_object_loss'), '{:.3f}')})"
    ]


def generation_markdown(report: dict[str, Any]) -> str:
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
        f"{'finished' if generation['stage2_complete'] else 'NOT finished'}), tokenizer {generation['tokenizer_checkpoint']}; "
        f"{generation['samples_per_class']} videos per class, {generation['steps']} decoding steps, temperature "
        f"{generation['temperature']:g}, seed {generation['seed']}. Real: the {generation['real_videos']} test videos.",
        "",
        f"Recognised as their class {code_judge_readings(generation)} (chance {generation['chance']:.1%}). "
        f"{generation['classifier']}.",
        "",
        *(f"Judged in pixels: {line}." for line in pixel_judge_lines(generation)),
        "",
        "| class | recognised | real | presence | real | smoothness (px) | real | real through the tokenizer | diversity | real |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {**generation["per_class"], "all": {
        "accuracy": generation["accuracy"], "real_accuracy": generation["real_accuracy"],
        "presence": generation["presence"], "real_presence": generation["real_presence"],
        "smoothness_px": generation["smoothness_px"], "real_smoothness_px": generation["real_smoothness_px"],
        "reconstructed_smoothness_px": generation["reconstructed"].get("smoothness_px"),
        "diversity": generation["diversity"], "real_diversity": generation["real_diversity"],
    }}
    for name, c in rows.items():
        lines.append(
            f"| {name} | {f(c['accuracy'], '{:.1%}')} | {f(c['real_accuracy'], '{:.1%}')} | {f(c['presence'], '{:.1%}')} | "
            f"{f(c['real_presence'], '{:.1%}')} | {f(c['smoothness_px'], '{:.3f}')} | {f(c['real_smoothness_px'], '{:.3f}')} | "
            f"{f(c.get('reconstructed_smoothness_px'), '{:.3f}')} | {f(c['diversity'], '{:.4f}')} | {f(c['real_diversity'], '{:.4f}')} |"
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
            "| | " + " | ".join(f"frame {t}" for t in frames) + " | mean | misses | no visible object |",
            "|---" * (len(frames) + 4) + "|",
        ]
        for k in PREDICTION_KINDS:
            s = by_kind[k]
            lines.append(f"| {k} PSNR (dB) | " + " | ".join(f(p["psnr_db"], "{:.2f}") for p in s["per_frame"])
                         + f" | {f(s['psnr_db'], '{:.2f}')} | | |")
            lines.append(f"| {k} centroid error (px) | "
                         + " | ".join(f(p["centroid_error_px"], "{:.3f}") for p in s["per_frame"])
                         + f" | {f(s['centroid_error_px'], '{:.3f}')} | {s['centroid_misses']} / {s['object_frames']}"
                         + f" | {s['frames_without_object']} / {s['object_frames']} |")
        lines.append("")
    return "\n".join(lines)


# (key in a metrics summary, row title, how to format it)
METRIC_ROWS = (
    ("psnr_db", "PSNR (dB, mean over frames)", "{:.2f}"),
    ("psnr_of_mean_mse_db", "PSNR of the mean MSE (dB)", "{:.2f}"),
    ("mse", "MSE", "{:.3g}"),
    ("ssim", "SSIM (per frame)", "{:.4f}"),
    ("foreground_psnr_db", "foreground PSNR (dB)", "{:.2f}"),
    ("centroid_error_px", "centroid error (px)", "{:.3f}"),
    ("centroid_miss_rate", "centroid miss rate", "{:.1%}"),
    ("single_object_share", "exactly one object (share of object frames)", "{:.1%}"),
)


# The rows of the summary that evaluate prints last (and `make demo` prints again at its end).
SUMMARY_ROWS = (
    ("psnr_db", "PSNR (dB)", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("foreground_psnr_db", "foreground PSNR (dB)", "{:.2f}"),
    ("centroid_error_px", "centroid error (px)", "{:.3f}"),
    ("centroid_miss_rate", "centroid miss rate", "{:.1%}"),
)


def code_meaning(codebook: dict[str, Any]) -> str:
    """One sentence on where the codes are spent (reports older than these numbers lack them)."""
    if "far_background" not in codebook:
        return "(no object / far-background code statistics in this report)"
    far, obj = codebook["far_background"], codebook["object"]
    return (
        f"perplexity {obj['perplexity']:.1f} on the object's cells ({obj['tokens']} tokens), "
        f"{far['perplexity']:.2f} on background {codebook['far_cells']}+ cells from it ({far['tokens']} tokens); "
        f"a black video encodes to {codebook['black_video_codes']} distinct code(s)"
    )
