"""MaskGIT's schedule and decoding on their own, with stub logits functions: no model, no training."""

from __future__ import annotations

import math

import pytest
import torch

from job.models.maskgit import cosine_schedule, decode, decode_frame_by_frame, draw_codes, inverse_cdf

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


def test_codes_are_drawn_as_often_as_their_probability_and_impossible_ones_never():
    """Decoding's draw (one uniform number a token, through the cumulative distribution): each
    code's share of 200,000 draws within 4 standard deviations of its probability."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    rows = probs.repeat(100_000, 1)
    drawn = draw_codes(rows, torch.Generator().manual_seed(0)).view(100_000, 2)
    for row in range(2):
        share = torch.bincount(drawn[:, row], minlength=6).double() / 100_000
        bound = 4 * (probs[row].double() * (1 - probs[row].double()) / 100_000).sqrt()
        assert ((share - probs[row].double()).abs() <= bound).all()
        assert (share[probs[row] == 0] == 0).all()


def test_a_uniform_number_that_rounds_up_to_the_total_draws_the_last_possible_code():
    """u x total can round to the total itself, past every code; the last code with any
    probability is then the draw, never one of none (or one past the codebook)."""
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    largest_below_one = torch.tensor([1 - 2**-24, 1.0, 0.0])  # 1.0: past the end, as rounding can give
    assert inverse_cdf(probs, largest_below_one).tolist() == [1, 2, 0]
    assert inverse_cdf(probs, torch.zeros(3)).tolist() == [0, 2, 0]


def test_draws_depend_on_the_generator_alone():
    probs = torch.softmax(torch.randn(500, 7, generator=torch.Generator().manual_seed(1)), -1)
    first = draw_codes(probs, torch.Generator().manual_seed(3))
    assert torch.equal(first, draw_codes(probs, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, draw_codes(probs, torch.Generator().manual_seed(4)))


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


# --- frame by frame -------------------------------------------------------------------------------

FRAMES, SPAN = 4, 10  # four "frames" of ten tokens each, in time order


def test_frame_by_frame_recovers_a_planted_answer_and_keeps_the_given_frames():
    generator = torch.Generator().manual_seed(3)
    answer = torch.randint(0, VOCAB, (3, FRAMES * SPAN), generator=generator)
    tokens = torch.full_like(answer, MASK)
    tokens[:, :SPAN] = (answer[:, :SPAN] + 1) % VOCAB  # a given first frame the logits disagree with
    decoded = decode_frame_by_frame(tokens, planted_logits(answer), frames=FRAMES, steps_per_frame=3,
                                    mask_id=MASK, generator=generator)
    assert torch.equal(decoded[:, :SPAN], tokens[:, :SPAN])
    assert torch.equal(decoded[:, SPAN:], answer[:, SPAN:])


def test_frame_by_frame_decodes_each_frame_after_the_one_before_in_its_steps():
    """While a frame is decoded, every frame before it is complete and every frame after it is
    still masked; each frame takes at most its steps (the given first frame none)."""
    generator = torch.Generator().manual_seed(4)
    answer = torch.randint(0, VOCAB, (2, FRAMES * SPAN), generator=generator)
    tokens = torch.full_like(answer, MASK)
    tokens[:, :SPAN] = answer[:, :SPAN]
    calls: list[torch.Tensor] = []
    decode_frame_by_frame(tokens, planted_logits(answer, calls), frames=FRAMES, steps_per_frame=4,
                          mask_id=MASK, generator=generator)
    frame_of_call = []
    for call in calls:
        masked_frames = (call == MASK).view(2, FRAMES, SPAN).any(2).any(0)  # (FRAMES,)
        current = int(masked_frames.float().argmax())
        assert not masked_frames[:current].any()
        assert (call.view(2, FRAMES, SPAN)[:, current + 1 :] == MASK).all()
        frame_of_call.append(current)
    assert frame_of_call == sorted(frame_of_call) and set(frame_of_call) == {1, 2, 3}
    assert all(frame_of_call.count(frame) <= 4 for frame in (1, 2, 3))


def copy_the_frame_before(tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a 'video' whose frames all repeat one token: a frame is certain to copy the frame
    before it once that is known, and uniform over the codebook until then."""
    logits = torch.zeros((*tokens.shape, VOCAB))
    frames = tokens.view(len(tokens), FRAMES, SPAN)
    for frame in range(1, FRAMES):
        known = frames[:, frame - 1, 0]
        sure = known != MASK
        logits.view(len(tokens), FRAMES, SPAN, VOCAB)[sure, frame] = torch.nn.functional.one_hot(
            known[sure], VOCAB).float()[:, None] * 60.0
    return logits


def test_frame_by_frame_draws_a_joint_that_parallel_decoding_cannot():
    """Given frame 0, the later frames must repeat it: decoded frame by frame they do, every time;
    all at once in one step, frames 2 and 3 are drawn before frame 1 is known, so they mostly do
    not. This is why predict decodes frame by frame (stage2.predict_frame_steps)."""
    generator = torch.Generator().manual_seed(5)
    first = torch.randint(0, VOCAB, (64, 1), generator=generator)
    tokens = torch.full((64, FRAMES * SPAN), MASK)
    tokens[:, :SPAN] = first
    by_frame = decode_frame_by_frame(tokens, copy_the_frame_before, frames=FRAMES, steps_per_frame=1,
                                     mask_id=MASK, generator=generator)
    assert (by_frame == first).all()
    at_once = decode(tokens, copy_the_frame_before, mask_id=MASK, steps=1, generator=generator)
    assert float((at_once[:, 2 * SPAN :] == first).double().mean()) < 0.3


def half_known_logits(answer: torch.Tensor, known: torch.Tensor, calls: list[torch.Tensor]):
    """The planted answer where ``known`` (certain tokens); uniform over the codebook elsewhere."""
    planted = planted_logits(answer)

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.clone())
        return torch.where(known[..., None], planted(tokens), uniform_logits(tokens))

    return logits_fn


def test_a_step_keeps_at_most_uncertain_per_step_uncertain_tokens_and_decoding_goes_on_until_none_is_masked():
    """uncertain_per_step: tokens the model is sure of follow the schedule; of the others (the drawn
    code's probability below CERTAIN), a step keeps at most that many a row, so that they are drawn
    a few at a time, each step given the ones before; decoding takes the steps it needs."""
    generator = torch.Generator().manual_seed(4)
    answer = torch.randint(0, VOCAB, (2, 40), generator=generator)
    known = torch.rand(2, 40, generator=generator) < 0.5
    tokens = torch.full_like(answer, MASK)
    tokens[1, :5] = answer[1, :5]  # given tokens, certain or not, are never drawn
    calls: list[torch.Tensor] = []
    decoded = decode(tokens, half_known_logits(answer, known, calls), mask_id=MASK, steps=4, generator=generator,
                     uncertain_per_step=2)
    given = tokens != MASK
    assert not (decoded == MASK).any()
    assert torch.equal(decoded[given], tokens[given])
    assert torch.equal(decoded[known & ~given], answer[known & ~given])
    uncertain_open = (~known & ~given).sum(1)
    for before, after in zip(calls, [*calls[1:], decoded]):
        newly = (before == MASK) & (after != MASK)
        assert ((newly & ~known).sum(1) <= 2).all()
        assert torch.equal(after[before != MASK], before[before != MASK])
    assert len(calls) >= math.ceil(int(uncertain_open.max()) / 2) > 4  # more passes than the 4 steps


def test_without_uncertain_tokens_the_cap_changes_nothing():
    answer = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(5))
    tokens = torch.full_like(answer, MASK)
    capped = decode(tokens, planted_logits(answer), mask_id=MASK, steps=6, generator=torch.Generator().manual_seed(6),
                    uncertain_per_step=1)
    plain = decode(tokens, planted_logits(answer), mask_id=MASK, steps=6, generator=torch.Generator().manual_seed(6))
    assert torch.equal(capped, plain) and torch.equal(capped, answer)
