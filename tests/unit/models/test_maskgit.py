"""MaskGIT's schedule and decoding on their own, with stub logits functions: no model, no training."""

from __future__ import annotations

import math

import pytest
import torch

from job.models.maskgit import cosine_schedule, decode

MASK = 9  # one id past a codebook of 9 codes
VOCAB = 9


def planted_logits(answer: torch.Tensor, calls: list[torch.Tensor] | None = None):
    """A logits function that knows the answer: overwhelming logits on it at every position."""

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(tokens.clone())
        logits = torch.full((*tokens.shape, VOCAB), -30.0)
        return logits.scatter(-1, answer[..., None], 30.0)

    return logits_fn


def uniform_logits(tokens: torch.Tensor) -> torch.Tensor:
    return torch.zeros((*tokens.shape, VOCAB))


def test_the_cosine_schedule_masks_everything_at_the_start_and_nothing_at_the_end():
    assert cosine_schedule(0.0) == 1.0 and cosine_schedule(1.0) == pytest.approx(0.0, abs=1e-12)
    points = [i / 10 for i in range(11)]
    values = [cosine_schedule(p) for p in points]
    assert values == sorted(values, reverse=True)
    # The same numbers for a tensor, which is how training draws its mask ratios.
    as_tensor = cosine_schedule(torch.tensor(points, dtype=torch.float64))
    assert torch.allclose(as_tensor, torch.tensor(values, dtype=torch.float64))


@pytest.mark.parametrize("steps", [1, 4, 12])
def test_decoding_recovers_a_planted_answer_exactly(steps):
    generator = torch.Generator().manual_seed(0)
    answer = torch.randint(0, VOCAB, (3, 40), generator=generator)
    tokens = torch.full_like(answer, MASK)
    decoded = decode(tokens, planted_logits(answer), mask_id=MASK, steps=steps, generator=generator)
    assert torch.equal(decoded, answer)


def test_given_tokens_never_change():
    generator = torch.Generator().manual_seed(1)
    answer = torch.randint(0, VOCAB, (2, 30), generator=generator)
    tokens = torch.full_like(answer, MASK)
    given = torch.zeros_like(answer, dtype=torch.bool)
    given[:, :10] = True
    tokens[given] = (answer[given] + 1) % VOCAB  # given tokens that the logits function disagrees with
    decoded = decode(tokens, planted_logits(answer), mask_id=MASK, steps=6, generator=generator)
    assert torch.equal(decoded[given], tokens[given])
    assert torch.equal(decoded[~given], answer[~given])
    assert not (decoded == MASK).any()


def test_each_step_fixes_as_many_tokens_as_the_schedule_says():
    generator = torch.Generator().manual_seed(2)
    steps, length = 8, 50
    tokens = torch.full((2, length), MASK)
    tokens[1, :10] = 0  # the second video has 10 given tokens, so 40 unknown
    calls: list[torch.Tensor] = []
    answer = torch.randint(0, VOCAB, (2, length), generator=generator)
    decode(tokens, planted_logits(answer, calls), mask_id=MASK, steps=steps, generator=generator)
    masked = [(call == MASK).sum(1).tolist() for call in calls]
    unknown = [length, length - 10]
    expected = [unknown] + [
        [math.floor(cosine_schedule(step / steps) * total) for total in unknown] for step in range(1, steps)
    ]
    # Decoding stops early once the schedule leaves nothing masked.
    assert masked == expected[: len(masked)]
    assert len(masked) == steps or all(count == 0 for count in expected[len(masked)])


def test_tokens_fixed_by_an_earlier_step_stay_fixed():
    generator = torch.Generator().manual_seed(3)
    calls: list[torch.Tensor] = []

    def recording(tokens):
        calls.append(tokens.clone())
        return uniform_logits(tokens)

    decoded = decode(torch.full((4, 64), MASK), recording, mask_id=MASK, steps=10, generator=generator)
    for before, after in zip(calls, [*calls[1:], decoded]):
        fixed = before != MASK
        assert torch.equal(after[fixed], before[fixed])


def test_the_same_generator_state_gives_the_same_tokens():
    def run(seed: int) -> torch.Tensor:
        return decode(torch.full((4, 64), MASK), uniform_logits, mask_id=MASK, steps=5,
                      generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def first_step_choices(choice_temperature: float) -> torch.Tensor:
    """(B, L) bool: the tokens the first of two steps fixed, where the first half of the
    positions are certain (one code) and the second half uniform over the codebook."""
    batch, length = 64, 40
    calls: list[torch.Tensor] = []

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.clone())
        logits = torch.zeros((*tokens.shape, VOCAB))
        logits[:, : length // 2, 0] = 30.0
        return logits

    tokens = torch.full((batch, length), MASK)
    decode(tokens, logits_fn, mask_id=MASK, steps=2, generator=torch.Generator().manual_seed(0),
           choice_temperature=choice_temperature)
    return calls[1] != MASK


def test_the_choice_temperature_sets_how_far_the_order_follows_confidence():
    """MaskGIT's choice temperature: at 0 the first step keeps only the most confident tokens;
    large, it keeps tokens regardless of confidence (a random order), which on mostly-background
    videos lets an object's uncertain tokens be decided early instead of all at the last step."""
    half = 20
    greedy = first_step_choices(0.0)
    assert greedy.sum(1).min() >= 1 and not greedy[:, half:].any()
    shuffled = first_step_choices(1e6)
    uncertain_share = float(shuffled[:, half:].sum()) / float(shuffled.sum())
    assert 0.35 < uncertain_share < 0.65
