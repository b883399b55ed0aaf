"""Quality regression (issues #12, #24): the smoke model must draw the object on a black frame, and
its stage 2 must draw it in the videos it generates.

The suite's smoke run (conftest's ``smoke_baseline``, 4 tiny epochs) is evaluated on the test
split and held against the all-black baseline, scored by the same code. A loss or output change
that brings back the haze (a grey offset over the whole frame, which SSIM's luminance term
punishes on black frames) or stops drawing the object (all-black wins plain PSNR on >95% black
frames) fails here, long before anyone runs the `small` demo.

The margins are well below what the smoke run measures (docs/quality.md) and well above what an
object-less or hazy model scores, so run-to-run noise does not flip them either way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from job.config import Stage2Config
from job.models.transformer import MaskedVideoTransformer, masked_token_loss
from tests.helpers import run_job

pytestmark = pytest.mark.timeout(300)


# Margins on the smoke run. Measured (docs/quality.md): PSNR +9.6 dB over all-black, SSIM 0.96
# against all-black's 0.68, foreground PSNR +9.9 dB, centroid error 0.27 px, no misses. The
# sigmoid output that made the haze scored PSNR -9.3 dB and SSIM 0.05; an all-black model has
# no foreground gain and misses every object.
MIN_PSNR_GAIN_DB = 3.0
MIN_FOREGROUND_PSNR_GAIN_DB = 4.0
MAX_MISS_RATE = 0.05
MAX_CENTROID_ERROR_PX = 1.5
# Tokens that mean something (docs/generation.md): the smoke tokenizer encodes black to one code and
# the far background to (nearly) one code. Measured: 1 code, perplexity 1.00; the smoke preset before
# it encoded each frame alone and pulled black cells to the background's code: 50 codes, 32.5.
MAX_FAR_BACKGROUND_PERPLEXITY = 1.5
# Generation by the smoke run's stage 2 (3 tiny epochs): measured, the object in 46.9% of the generated
# frames (8 videos). The stage 2 issue #24 started from showed it in 3.1% of small's; a stage 2 or a
# decoding that draws only background shows it in none.
MIN_SMOKE_GENERATED_PRESENCE = 0.2
# Stage 2 on a toy of its own (below): the smoke run's stage 2 trains too little to learn motion.
# Measured: 97% of predicted toy videos exact with stage2.conv_position, 0% without it.
MIN_TOY_PREDICTIONS_EXACT = 0.8

@pytest.fixture(scope="module")
def smoke_report(smoke_baseline, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("quality") / "run"
    shutil.copytree(smoke_baseline, run)
    result = run_job("evaluate", "--preset", "smoke", "--run-uri", str(run))
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return json.loads((Path(run) / "eval" / "report.json").read_text())


def test_smoke_model_draws_the_object(smoke_report):
    model, black = smoke_report["metrics"]["model"], smoke_report["metrics"]["baseline_black"]
    assert model["foreground_psnr_db"] >= black["foreground_psnr_db"] + MIN_FOREGROUND_PSNR_GAIN_DB, (model, black)
    assert model["centroid_miss_rate"] <= MAX_MISS_RATE, model
    assert model["centroid_error_px"] <= MAX_CENTROID_ERROR_PX, model


def test_smoke_model_keeps_the_background_black(smoke_report):
    # A haze of 0.02 over the frame costs SSIM far more than missing the object does.
    model, black = smoke_report["metrics"]["model"], smoke_report["metrics"]["baseline_black"]
    assert model["ssim"] > black["ssim"], (model, black)
    assert model["psnr_db"] >= black["psnr_db"] + MIN_PSNR_GAIN_DB, (model, black)


def test_smoke_tokens_give_black_one_code(smoke_report):
    codebook = smoke_report["codebook"]
    assert codebook["black_video_codes"] == 1, codebook
    assert codebook["far_background"]["perplexity"] <= MAX_FAR_BACKGROUND_PERPLEXITY, codebook
    assert codebook["object"]["perplexity"] > 2.0, codebook  # the object's codes still say where it is



def test_smoke_stage2_draws_the_object_in_generated_videos(smoke_report):
    generation = smoke_report["generation"]
    assert generation["presence"] >= MIN_SMOKE_GENERATED_PRESENCE, generation
    assert generation["real_presence"] == 1.0  # every real frame shows it: the judge sees objects


# --- stage 2 alone, on token videos of one object code -------------------------------------------

TOY_SHAPE = (4, 6, 6)  # latent t, h, w
TOY_DIRECTIONS = torch.tensor([(0, 1), (0, -1), (1, 0), (-1, 0)])  # the class: right, left, down, up


def toy_videos(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token videos (count, t, h, w): code 1 on one cell a frame, moving one cell a frame in the
    class's direction, code 0 elsewhere: a one-object video's codes with its tokenizer taken away."""
    frames, size = TOY_SHAPE[0], TOY_SHAPE[1]
    labels = torch.randint(0, len(TOY_DIRECTIONS), (count,), generator=generator)
    step = TOY_DIRECTIONS[labels]
    low = torch.where(step < 0, frames - 1, 0)
    high = torch.where(step > 0, size - frames, size - 1)
    start = low + (torch.rand(count, 2, generator=generator) * (high - low + 1)).long()
    videos = torch.zeros(count, *TOY_SHAPE, dtype=torch.long)
    for t in range(frames):
        where = start + t * step
        videos[torch.arange(count), t, where[:, 0], where[:, 1]] = 1
    return videos, labels


def test_stage2_learns_to_continue_a_moving_object():
    """The quality regression for stage 2 and its decoding: trained 300 steps on toy token videos,
    predicting the last two frames from the first two must put the one object exactly where its
    motion takes it. A stage 2 that only learns where objects usually are, or decoding that drops
    or doubles the object, fails."""
    torch.manual_seed(0)
    cfg = Stage2Config(dim=32, depth=2, heads=2, predict_latent_frames=2, conv_position=True)
    model = MaskedVideoTransformer(cfg, 2, TOY_SHAPE, len(TOY_DIRECTIONS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        videos, labels = toy_videos(32, generator)
        batch = model.mask_for_training(videos, labels, generator=generator)
        loss = masked_token_loss(model(batch.tokens, batch.classes, at=batch.masked), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    videos, labels = toy_videos(64, torch.Generator().manual_seed(5))
    none = torch.full_like(labels, len(TOY_DIRECTIONS))
    predicted = model.generate(none, given=videos, given_frames=2, generator=torch.Generator().manual_seed(2))
    exact = (predicted == videos).flatten(1).all(1).float().mean()
    assert float(exact) >= MIN_TOY_PREDICTIONS_EXACT, f"{float(exact):.0%} of predicted toy videos exact"
