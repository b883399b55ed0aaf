"""The goals a report is held to: targets, the far-background goal, and per-class ratios."""

from __future__ import annotations

from job.eval.goals import (
    code_classifier_goal, far_background_goal, generated_class_goal, goal, smoothness_goal, worst_ratio,
)


def test_a_goal_without_a_value_is_not_met():
    assert goal(None, 1.0, ">=")["met"] is False
    assert goal(2.0, 1.0, ">=")["met"] and not goal(0.5, 1.0, ">=")["met"] and goal(0.5, 1.0, "<=")["met"]


def test_the_far_background_goal_reports_the_object_perplexity_beside_it():
    codebook = {"far_background": {"perplexity": 1.4}, "object": {"perplexity": 30.0}}
    result = far_background_goal(codebook)
    assert result["met"] and result["object_perplexity"] == 30.0
    assert not far_background_goal({**codebook, "far_background": {"perplexity": 200.0}})["met"]


def test_a_ratio_goal_is_met_only_when_every_class_is_within_bounds():
    per_class = {
        "a": {"diversity": 1.0, "real_diversity": 1.0},
        "b": {"diversity": 3.0, "real_diversity": 1.0},  # 3x real: out
        "c": {"diversity": 0.9, "real_diversity": 1.0},
    }
    result = worst_ratio(per_class, "diversity", (0.5, 2.0))
    assert not result["met"] and result["value"] == 3.0
    per_class["b"]["diversity"] = 1.5
    assert worst_ratio(per_class, "diversity", (0.5, 2.0))["met"]
    per_class["c"]["diversity"] = None  # a class without a number cannot pass
    assert not worst_ratio(per_class, "diversity", (0.5, 2.0))["met"]


def test_the_smoothness_goal_shows_what_the_tokenizers_own_reconstructions_score():
    """A straight path's second difference is a fraction of a pixel, so the tokenizer's wobble alone
    can put a class past 1.5x: the report says so beside the goal."""
    per_class = {
        "linear": {"smoothness_px": 0.5, "real_smoothness_px": 0.25, "reconstructed_smoothness_px": 0.42},
        "circular": {"smoothness_px": 4.0, "real_smoothness_px": 4.0, "reconstructed_smoothness_px": 4.0},
    }
    result = smoothness_goal(per_class)
    assert not result["met"] and result["value"] == 2.0
    floor = result["through_tokenizer"]
    assert floor["per_class"] == {"linear": 1.68, "circular": 1.0} and not floor["met"]
    per_class["linear"]["reconstructed_smoothness_px"] = 0.3
    assert smoothness_goal(per_class)["through_tokenizer"]["met"]
    del per_class["linear"]["reconstructed_smoothness_px"]  # a report from before the floor was measured
    assert smoothness_goal(per_class)["through_tokenizer"]["per_class"]["linear"] is None


def test_the_codes_say_the_class_if_either_judge_of_codes_reads_it():
    """The linear probe reads a class from codes that say which way the object moves (a halo); the
    code-track judge from where a clean object's codes go. Either proves the codes carry it."""
    halo = code_classifier_goal({"accuracy": 1.0, "track_accuracy": 0.933})
    clean = code_classifier_goal({"accuracy": 0.825, "track_accuracy": 1.0})
    assert halo["met"] and halo["value"] == 1.0 and clean["met"] and clean["value"] == 1.0
    assert (clean["linear_probe"], clean["code_track"]) == (0.825, 1.0)
    neither = code_classifier_goal({"accuracy": 0.9, "track_accuracy": 0.97})
    assert not neither["met"] and neither["value"] == 0.97


def test_generated_class_accuracy_is_the_trusted_judges_reading():
    """On halo-free codes the probe reads 75.8% of real test videos and the code track 100%: generated
    videos are read by the code track, and both readings stay in the goal."""
    generation = {"accuracy": 0.95, "real_accuracy": 0.758, "code_track_accuracy": 0.25,
                  "real_code_track_accuracy": 1.0}
    result = generated_class_goal(generation)
    assert (result["value"], result["met"], result["judge"]) == (0.25, False, "code_track")
    assert (result["linear_probe"], result["code_track"]) == (0.95, 0.25)
    older = generated_class_goal({"accuracy": 0.95, "real_accuracy": 1.0})  # a report from before it
    assert (older["value"], older["met"], older["judge"]) == (0.95, True, "linear_probe")
