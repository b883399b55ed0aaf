"""What `evaluate` holds a tokenizer to (docs/quality.md): each goal with its value, its target
and whether it is met, stated against the all-black baseline where a fixed number would mislead."""

from __future__ import annotations

from typing import Any

from job.eval.code_judges import CODE_TRACK, trusted_judge
from job.eval.frame_metrics import BLACK, CONSTANT_VELOCITY, MODEL

# The classes whose motion a constant velocity does not follow: the model must beat it on each.
NONLINEAR_CLASSES = ("circular", "helical", "parabolic")
GENERATION_ACCURACY_TARGET = 0.9
MIN_GENERATED_PRESENCE = 0.95  # frames that show the object
MIN_SINGLE_OBJECT = 0.95  # of those, frames that show exactly one
DIVERSITY_RATIO = (0.5, 2.0)  # generated against real, per class
MAX_SMOOTHNESS_RATIO = 1.5  # generated centroid acceleration against the real class's
MAX_LINEAR_PREDICTION_PX = 1.0  # where constant velocity is near exact

# The tokenizer's goals (see goals()). The centroid goal also needs the object to be found:
# missing it must not pass for precision.
MIN_PSNR_GAIN_DB = 10.0  # over all-black
MIN_SSIM = 0.95  # and above all-black's
MIN_FOREGROUND_PSNR_GAIN_DB = 15.0  # over all-black
MAX_CENTROID_ERROR_PX = 0.5
MAX_CENTROID_MISS_RATE = 0.01
MIN_CLASSIFIER_ACCURACY = 0.98
# A reconstruction shows the one object a real frame shows: stage 2 generates through the decoder.
MIN_RECONSTRUCTION_SINGLE_OBJECT = 0.95
# Black far from the object is (nearly) one code: stage 2 then models the scene, not noise.
MAX_FAR_BACKGROUND_PERPLEXITY = 2.0
# The order goals() lists them in; report.json sorts its keys, so a reread report needs it.
GOAL_NAMES = (
    "psnr_above_black_db", "ssim", "foreground_psnr_above_black_db", "centroid_error_px", "classifier_accuracy",
    "far_background_code_perplexity", "reconstruction_single_object",
)


def goals(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The tokenizer's goals, each with its value, its target and whether it is met.

    Each one is stated against the all-black baseline where a fixed number would mislead: on
    frames that are >95% black, black alone scores a high PSNR and SSIM.
    """
    model, black = report["metrics"][MODEL], report["metrics"][BLACK]
    ssim = goal(model["ssim"], MIN_SSIM, ">=")
    ssim["baseline_black"] = black["ssim"]
    ssim["met"] = ssim["met"] and black["ssim"] is not None and model["ssim"] > black["ssim"]
    centroid = goal(model["centroid_error_px"], MAX_CENTROID_ERROR_PX, "<=")
    miss_rate = model["centroid_miss_rate"]
    centroid["miss_rate"] = miss_rate
    centroid["max_miss_rate"] = MAX_CENTROID_MISS_RATE
    centroid["met"] = centroid["met"] and miss_rate is not None and miss_rate <= MAX_CENTROID_MISS_RATE
    return {
        "psnr_above_black_db": goal(_gain(model, black, "psnr_db"), MIN_PSNR_GAIN_DB, ">="),
        "ssim": ssim,
        "foreground_psnr_above_black_db": goal(
            _gain(model, black, "foreground_psnr_db"), MIN_FOREGROUND_PSNR_GAIN_DB, ">="
        ),
        "centroid_error_px": centroid,
        "classifier_accuracy": code_classifier_goal(report["classifier"]),
        "far_background_code_perplexity": far_background_goal(report["codebook"]),
        "reconstruction_single_object": goal(model.get("single_object_share"), MIN_RECONSTRUCTION_SINGLE_OBJECT, ">="),
    }


def far_background_goal(codebook: dict[str, Any]) -> dict[str, Any]:
    """The far background's code perplexity, with the object cells' beside it (which must stay
    high: the object's codes say where in its cell it is)."""
    result = goal(codebook["far_background"]["perplexity"], MAX_FAR_BACKGROUND_PERPLEXITY, "<=")
    result["object_perplexity"] = codebook["object"]["perplexity"]
    return result


def code_classifier_goal(classifier: dict[str, Any]) -> dict[str, Any]:
    """The codes say the class if a judge of codes reads it from the test split: the linear probe on
    their bits (which reads which way a halo of codes says the object moves) or the code-track judge
    (which reads where the object's codes go; halo-free codes carry the class only there)."""
    probe, track = classifier["accuracy"], classifier["track_accuracy"]
    result = goal(max(probe, track), MIN_CLASSIFIER_ACCURACY, ">=")
    result.update(linear_probe=probe, code_track=track)
    return result


def _gain(model: dict[str, Any], baseline: dict[str, Any], key: str) -> float | None:
    if model[key] is None or baseline[key] is None:
        return None
    return model[key] - baseline[key]


def ordered_goals(report_goals: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The goals in GOAL_NAMES order, then any others (a report from other code) by name."""
    rank = {name: i for i, name in enumerate(GOAL_NAMES)}
    return sorted(report_goals.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def goal(value: float | None, target: float, comparison: str) -> dict[str, Any]:
    if value is None:
        met = False
    else:
        met = value >= target if comparison == ">=" else value <= target
    return {"value": value, "target": target, "comparison": comparison, "met": met}


def _miss_rate(summary: dict[str, Any]) -> float | None:
    """Of the predicted frames whose truth shows the object, those that show no visible object."""
    return summary["frames_without_object"] / summary["object_frames"] if summary["object_frames"] else None


def generated_class_goal(generation: dict[str, Any]) -> dict[str, Any]:
    """Generated videos recognised as their class by the judge of codes that reads the real test
    videos better (the probe on reports from before the code-track judge), both readings beside it."""
    probe, track = generation["accuracy"], generation.get("code_track_accuracy")
    judge = trusted_judge(generation["real_accuracy"], generation.get("real_code_track_accuracy"))
    result = goal(track if judge == CODE_TRACK else probe, GENERATION_ACCURACY_TARGET, ">=")
    result.update(judge=judge, linear_probe=probe, code_track=track)
    return result


def _below_baseline(by_kind: dict[str, dict[str, Any]]) -> dict[str, Any]:
    model, baseline = by_kind[MODEL], by_kind[CONSTANT_VELOCITY]
    miss_rate = _miss_rate(model)
    result = goal(model["centroid_error_px"], baseline["centroid_error_px"] or 0.0, "<")
    result["met"] = (
        model["centroid_error_px"] is not None and baseline["centroid_error_px"] is not None
        and model["centroid_error_px"] < baseline["centroid_error_px"]
        and miss_rate is not None and miss_rate <= MAX_CENTROID_MISS_RATE
        and _draws_one_object(model)
    )
    result.update(baseline="constant velocity", miss_rate=miss_rate, max_miss_rate=MAX_CENTROID_MISS_RATE,
                  single_object=model.get("single_object_share"), min_single_object=MIN_SINGLE_OBJECT)
    return result


def _draws_one_object(summary: dict[str, Any]) -> bool:
    """Blobs either side of the object have its centroid: a prediction draws one object."""
    single = summary.get("single_object_share")
    return single is not None and single >= MIN_SINGLE_OBJECT


def generation_goals(generation: dict[str, Any], prediction: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Generated videos recognised as their class; predicted centroids closer than the
    constant-velocity baseline's, overall and on each non-linear class (with at most the
    stage-1 goal's miss rate, counted in frames without a visible object, so that missing the
    object does not pass for precision, and one object in as many frames as generation needs,
    so that blobs around it do not either)."""
    goals = {
        "generated_class_accuracy": generated_class_goal(generation),
        "generated_class_accuracy_by_track": goal(generation.get("track_accuracy"), GENERATION_ACCURACY_TARGET, ">="),
        "generated_object_presence": goal(generation["presence"], MIN_GENERATED_PRESENCE, ">="),
        "generated_single_object": goal(generation.get("single_object"), MIN_SINGLE_OBJECT, ">="),
        "generated_diversity_ratio": worst_ratio(generation["per_class"], "diversity", DIVERSITY_RATIO),
        "generated_smoothness_ratio": smoothness_goal(generation["per_class"]),
    }
    goals["prediction_centroid_below_constant_velocity"] = _below_baseline(prediction["overall"])
    for name in NONLINEAR_CLASSES:
        if name in prediction["per_class"]:
            goals[f"prediction_centroid_below_constant_velocity_{name}"] = _below_baseline(prediction["per_class"][name])
    if "linear" in prediction["per_class"]:
        linear = prediction["per_class"]["linear"][MODEL]
        goals["prediction_centroid_linear_px"] = goal(linear["centroid_error_px"], MAX_LINEAR_PREDICTION_PX, "<=")
        goals["prediction_centroid_linear_px"]["met"] &= _draws_one_object(linear)
    goals["prediction_miss_rate"] = goal(_miss_rate(prediction["overall"][MODEL]), MAX_CENTROID_MISS_RATE, "<=")
    return goals


def smoothness_goal(per_class: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Generated tracks as smooth as the real class's, beside what the tokenizer's own
    reconstructions of the real videos score: their centroids are slightly off in every frame, which
    is a large share of a straight path's tiny second difference (docs/generation.md), and no stage 2
    can pass a class where they fail."""
    result = worst_ratio(per_class, "smoothness_px", (0.0, MAX_SMOOTHNESS_RATIO))
    result["through_tokenizer"] = worst_ratio(
        per_class, "smoothness_px", (0.0, MAX_SMOOTHNESS_RATIO), measured="reconstructed_smoothness_px")
    return result


def worst_ratio(per_class: dict[str, dict[str, Any]], key: str, bounds: tuple[float, float],
                measured: str | None = None) -> dict[str, Any]:
    """Generated (or ``measured``, another key of the same classes) against real, class by class:
    the value is the class furthest outside ``bounds`` (or nearest their edge); met when every
    class is within them."""
    measured = measured or key
    ratios = {
        name: c[measured] / c[f"real_{key}"] if c.get(measured) is not None and c.get(f"real_{key}") else None
        for name, c in per_class.items()
    }
    low, high = bounds
    known = {name: r for name, r in ratios.items() if r is not None}
    worst = max(known, key=lambda n: max(low / known[n] if known[n] > 0 else float("inf"), known[n] / high),
                default=None)
    result = goal(known.get(worst), high, "<=")
    result.update(per_class=ratios, bounds=list(bounds), met=bool(known) and len(known) == len(ratios)
                  and all(low <= r <= high for r in known.values()))
    return result
