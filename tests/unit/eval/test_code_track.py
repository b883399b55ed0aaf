"""The judges of codes (job.eval.code_judges): the code-track judge reads the class from where a
clip's codes that are not the background's lie over time, not from which codes they are; evaluate
reads a generated video's class with whichever judge reads real videos better."""

from __future__ import annotations

import torch

from job.eval.code_judges import CODE_TRACK, PROBE, code_track_features, fit_code_judges, trusted_judge
from job.eval.probe import fit_linear_probe

BACKGROUND = 3


def clips(paths: list[list[tuple[int, int]]], object_code: int = 5, size: int = 12) -> torch.Tensor:
    """(N, t, size, size) codes: the background's everywhere, ``object_code`` at each path's cells."""
    codes = torch.full((len(paths), len(paths[0]), size, size), BACKGROUND)
    for n, path in enumerate(paths):
        for t, (row, col) in enumerate(path):
            codes[n, t, row, col] = object_code
    return codes


def straight(row: int, col: int) -> list[tuple[int, int]]:
    return [(row, col + t) for t in range(5)]


def turning(row: int, col: int) -> list[tuple[int, int]]:
    return [(row, col), (row, col + 1), (row + 1, col + 2), (row + 2, col + 2), (row + 3, col + 1)]


def test_the_judge_reads_where_the_object_codes_go_not_which_codes_they_are():
    starts = [(r, c) for r in range(1, 7) for c in range(1, 6)]
    train = clips([straight(*s) for s in starts[::2]] + [turning(*s) for s in starts[::2]])
    labels = torch.tensor([0] * len(starts[::2]) + [1] * len(starts[::2]))
    judge = fit_linear_probe(code_track_features(train, BACKGROUND), labels, 2)
    held_out = starts[1::2]
    test_labels = torch.tensor([0] * len(held_out) + [1] * len(held_out))
    for code in (5, 9):  # another object code, the same tracks: the same verdicts
        test = clips([straight(*s) for s in held_out] + [turning(*s) for s in held_out], object_code=code)
        assert torch.equal(judge.predict(code_track_features(test, BACKGROUND)), test_labels)


def test_the_track_is_the_object_cells_own():
    """A straight path of one cell a frame: speeds of exactly 1 cell and no turn; the judge reads the
    cells that are not the background's, however much background surrounds them."""
    features = code_track_features(clips([straight(2, 1)]), BACKGROUND)[0]
    steps = 4
    assert torch.allclose(features[:steps], torch.ones(steps))  # speeds
    assert torch.allclose(features[steps:], torch.tensor([0.0] * 3 * 3 + [1.0] * 3))  # accel, turn, |turn|, along


def test_a_clip_of_background_only_has_no_track():
    features = code_track_features(torch.full((2, 5, 8, 8), BACKGROUND), BACKGROUND)
    assert torch.equal(features, torch.zeros_like(features))


def test_fitted_judges_read_held_out_clips_and_the_background_is_the_commonest_code():
    starts = [(r, c) for r in range(1, 7) for c in range(1, 6)]
    train = clips([straight(*s) for s in starts[::2]] + [turning(*s) for s in starts[::2]])
    labels = torch.tensor([0] * len(starts[::2]) + [1] * len(starts[::2]))
    judges = fit_code_judges(train, labels, codebook_bits=4, num_classes=2, device=torch.device("cpu"))
    assert judges.background == BACKGROUND
    held_out = starts[1::2]
    test = clips([straight(*s) for s in held_out] + [turning(*s) for s in held_out], object_code=9)
    truth = torch.tensor([0] * len(held_out) + [1] * len(held_out))
    assert torch.equal(judges.by_track(test), truth)
    assert judges.by_probe(test).shape == truth.shape  # a verdict per clip, whatever its accuracy


def test_a_generated_class_is_read_by_the_judge_that_reads_real_videos_better():
    assert trusted_judge(0.758, 1.0) == CODE_TRACK
    assert trusted_judge(1.0, 0.933) == PROBE
    assert trusted_judge(0.9, 0.9) == PROBE  # a tie keeps the probe
    assert trusted_judge(0.9, None) == PROBE  # a report from before the code-track judge
