"""MaskGIT (Chang et al. 2022): the mask schedule and iterative parallel decoding, as pure
functions of a logits function, so that decoding is tested without a trained model.

One schedule serves both sides: training masks ``schedule(u)`` of a sample's tokens for a
uniform ``u``, and decoding leaves ``schedule((step + 1) / steps)`` of the unknown tokens
masked after each step, so that the model is trained on exactly the mask ratios it meets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

Ratio = TypeVar("Ratio", float, torch.Tensor)


def cosine_schedule(progress: Ratio) -> Ratio:
    """The share of tokens still masked at ``progress`` in [0, 1] (1 at 0, 0 at 1): MaskGIT's
    cosine schedule. A float for a float, a tensor (elementwise) for a tensor."""
    if isinstance(progress, torch.Tensor):
        return torch.cos(0.5 * math.pi * progress)
    return math.cos(0.5 * math.pi * progress)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(N,) int64: for each row of ``probs`` (N, V), the code whose stretch of the cumulative
    distribution holds ``uniform`` (N,) in [0, 1] times the row's total: for a uniform number, a
    draw from the row. A product that rounds to the total or past it gives the last code with any
    probability, never one without."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    first_past = torch.searchsorted(cdf, uniform[:, None].to(cdf.dtype) * total, right=True)
    last_possible = torch.searchsorted(cdf, total)
    return torch.minimum(first_past, last_possible).squeeze(1)


def draw_codes(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One code drawn from each row of ``probs`` (N, V), from one uniform number a row: the same
    distribution as ``torch.multinomial(probs, 1)``, which on the CPU draws a random number for
    every code of every row: most of a decoding step's time beside a small model (docs/benchmarks.md)."""
    return inverse_cdf(probs, torch.rand(len(probs), generator=generator, device=probs.device))


# A drawn code this probable counts as certain for ``decode``'s ``uncertain_per_step``: black
# cells' code is near certain, and where the object's codes go is not.
CERTAIN = 0.9


def decode(
    tokens: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    mask_id: int,
    steps: int,
    schedule: Callable[[float], float] = cosine_schedule,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    choice_temperature: float = 1.0,
    positions: torch.Tensor | None = None,
    uncertain_per_step: int = 0,
) -> torch.Tensor:
    """Fill the ``mask_id`` positions of ``tokens`` (B, L) int64 by iterative parallel decoding.

    ``logits_fn(tokens)`` gives (B, L, V) logits for the current tokens. Each step samples every
    unknown token from the softmax at ``temperature``, keeps them, then masks again the least
    confident of this step's choices so that ``floor(schedule((step + 1) / steps) * unknown)``
    stay masked; tokens fixed by an earlier step, and the given ones, never change. Confidence
    is the log-probability of the sampled token plus Gumbel noise scaled by ``choice_temperature``
    and annealed to 0 over the steps (early steps explore, late ones commit): at 0 the order
    follows confidence alone; the larger it is, the closer the order comes to a random one. All
    draws come from ``generator`` (torch's global one if None): the same generator state gives
    the same tokens. ``positions`` (L,) bool, if given: the only positions this call fills; masked
    tokens elsewhere stay masked, and the logits function sees them so.
    ``uncertain_per_step`` N > 0: of the tokens a step would keep, at most N a row whose drawn code
    is less probable than ``CERTAIN`` (the most confident of them), so that an object's codes
    are drawn a few at a time, each given the ones before; decoding then goes on past ``steps``,
    on the schedule's end, until nothing is masked (docs/generation.md).
    Returns the (B, L) tokens, none of them masked (within ``positions``).
    """
    device = tokens.device
    open_positions = torch.ones(tokens.shape[1], dtype=torch.bool, device=device) if positions is None else positions
    total = ((tokens == mask_id) & open_positions).sum(1)
    step = 0
    while True:
        still_masked = (tokens == mask_id) & open_positions
        # Only the unknown tokens are scored and drawn: beside a small model, softmax and sampling
        # over every position are most of a step, and the known ones (given, or fixed by an
        # earlier step) would be drawn only to be discarded.
        probs = F.softmax(logits_fn(tokens)[still_masked].float() / max(temperature, 1e-6), dim=-1)
        drawn = draw_codes(probs, generator)
        noise = -torch.log(-torch.log(torch.rand(len(drawn), generator=generator, device=device) + 1e-20) + 1e-20)
        tokens = tokens.masked_scatter(still_masked, drawn)
        progress = min((step + 1) / steps, 1.0)
        drawn_probs = probs.gather(-1, drawn[:, None]).squeeze(1)
        # Known tokens are never re-masked: infinitely confident.
        confidence = torch.full(tokens.shape, math.inf, device=device).masked_scatter(
            still_masked, drawn_probs.log() + choice_temperature * (1 - progress) * noise
        )
        # The last scheduled step, and every one after it, leaves nothing masked by the schedule.
        left = (schedule(progress) * total).floor().long() if progress < 1 else torch.zeros_like(total)
        # Re-mask the least confident of this step's choices; earlier choices stay.
        ranks = confidence.argsort(dim=1).argsort(dim=1)
        remask = still_masked & (ranks < left[:, None])
        if uncertain_per_step:
            uncertain = torch.zeros_like(still_masked).masked_scatter(still_masked, drawn_probs < CERTAIN)
            kept_uncertain = still_masked & uncertain & ~remask
            order = confidence.masked_fill(~kept_uncertain, -math.inf).argsort(dim=1, descending=True).argsort(dim=1)
            remask |= kept_uncertain & (order >= uncertain_per_step)
        tokens = torch.where(remask, torch.full_like(tokens, mask_id), tokens)
        step += 1
        if not bool(remask.any()):
            return tokens


def decode_frame_by_frame(
    tokens: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor], *, mask_id: int, frames: int,
    steps_per_frame: int, **options,
) -> torch.Tensor:
    """``decode`` one frame after another: ``tokens`` (B, L) are ``frames`` equal spans in time
    order, and each span's masked tokens are decoded in ``steps_per_frame`` steps while the later
    ones stay masked, so that each frame is drawn from what the frames before it became.
    ``options``: decode's other keyword arguments (schedule, generator, temperatures)."""
    length = tokens.shape[1]
    if length % frames:
        raise ValueError(f"{length} tokens do not split into {frames} frames")
    span = length // frames
    for frame in range(frames):
        positions = torch.zeros(length, dtype=torch.bool, device=tokens.device)
        positions[frame * span : (frame + 1) * span] = True
        if bool((tokens[:, positions] == mask_id).any()):
            tokens = decode(tokens, logits_fn, mask_id=mask_id, steps=steps_per_frame, positions=positions, **options)
    return tokens
