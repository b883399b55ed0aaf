"""The video tokenizer: shapes, codes, gradients, determinism, and a loss that an all-black output loses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from vector_quantize_pytorch import LFQ

from job.config import ConfigError, ModelConfig, build_config, config_from_dict
from job.models.blocks import Upsample, output_activation
from job.models.tokenizer import (
    LFQ_INV_TEMPERATURE,
    VideoTokenizer,
    codebook_entropy,
    codebook_stats,
    compute_loss,
    lfq_training_terms,
    reconstruction_loss,
)
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(120)

PRESETS = ("smoke", "small")


def make_model(preset: str, seed: int = 0) -> tuple[VideoTokenizer, ModelConfig]:
    cfg = build_config(preset)
    torch.manual_seed(seed)
    return VideoTokenizer(cfg.model, cfg.data), cfg.model


def sparse_videos(batch: int, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Videos like the dataset's: one small Gaussian blob per frame on black, values in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, frames, 2, generator=generator) * torch.tensor([height - 6.0, width - 6.0]) + 3.0
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    dy = ys - centres[..., 0, None, None]
    dx = xs - centres[..., 1, None, None]
    blobs = torch.exp(-(dy**2 + dx**2) / (2 * 1.0**2))
    return blobs[:, None]


def videos_for(model: VideoTokenizer, batch: int = 2) -> torch.Tensor:
    return sparse_videos(batch, *model.input_shape)


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_shapes_and_ranges(preset: str) -> None:
    model, _ = make_model(preset)
    video = videos_for(model)
    out = model(video)
    assert out.recon.shape == video.shape
    assert 0.0 <= out.recon.min() and out.recon.max() <= 1.0
    assert out.codes.shape == (2, *model.latent_shape())
    assert out.codes.dtype == torch.int64
    assert 0 <= out.codes.min() and out.codes.max() < model.codebook_size
    assert out.entropy_loss.ndim == 0 and torch.isfinite(out.entropy_loss)
    assert out.commitment_loss.ndim == 0 and torch.isfinite(out.commitment_loss)
    assert out.commitment_loss > 0  # train mode: LFQ's commitment term is computed


@pytest.mark.parametrize("scale", [0.002, 0.01, 0.5])
def test_lfq_terms_are_the_librarys_values_and_gradients(scale: float) -> None:
    """The tokenizer computes LFQ's training terms itself: the per-code entropy as a sum over the
    bits (the softmax over every code of a sign codebook is a product of one per bit), so that
    the 256- or 1,024-way softmax is only computed for the diversity bonus. Values and gradients
    equal the library's own (vector_quantize_pytorch.LFQ in training mode), from nearly uniform
    codes (scale 0.002) to nearly certain ones (0.5)."""
    model, _ = make_model("small")
    bits = model.config.codebook_bits
    latent = (torch.randn(2, bits, 8, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
              * scale).float()
    ours_in, theirs_in = latent.clone().requires_grad_(), latent.clone().requires_grad_()
    quantized, codes, per_sample, batch, commitment = lfq_training_terms(model.quantizer, ours_in, with_batch=True)
    library = LFQ(dim=bits, codebook_size=2**bits, entropy_loss_weight=1.0, commitment_loss_weight=1.0).train()
    (their_quantized, their_codes, _), breakdown = library(
        theirs_in, inv_temperature=LFQ_INV_TEMPERATURE, return_loss_breakdown=True)
    assert torch.equal(quantized, their_quantized) and torch.equal(codes, their_codes.long())
    for ours, theirs in ((per_sample, breakdown.per_sample_entropy), (batch, breakdown.batch_entropy),
                         (commitment, breakdown.commitment)):
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-4, abs=1e-6)
    weights = torch.randn(4)
    torch.stack([quantized.square().mean(), per_sample, batch, commitment]).mul(weights).sum().backward()
    torch.stack([their_quantized.square().mean(), breakdown.per_sample_entropy, breakdown.batch_entropy,
                 breakdown.commitment]).mul(weights).sum().backward()
    # Within 0.1% of the largest gradient: the library clamps each code's probability at 1e-5
    # inside its logarithm, the sum over the bits does not need to.
    difference = (ours_in.grad - theirs_in.grad).abs().max() / theirs_in.grad.abs().max()
    assert difference < 1e-3


def rank_tokens(rank: int) -> torch.Tensor:
    return torch.randn(300, 8, generator=torch.Generator().manual_seed(rank)) * 0.005


def codebook_entropy_on_a_rank(rank: int, port: int, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, _ = make_model("small")
        results.put((rank, codebook_entropy(model.quantizer, rank_tokens(rank), across_ranks=True).item()))
    finally:
        torch.distributed.destroy_process_group()


def test_the_diversity_bonus_is_over_every_ranks_tokens() -> None:
    """Under DDP, LFQ averages the soft code assignment over all ranks before its entropy (the
    codebook's usage is the whole batch's); the tokenizer's own term does the same: two gloo ranks
    get the entropy of both ranks' tokens together. (LFQ 1.32's helper gives each rank half its
    own mean: 3.10 nats here, where both together have 5.53.)"""
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=codebook_entropy_on_a_rank, args=(rank, port, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    values = dict(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    model, _ = make_model("small")
    together = codebook_entropy(model.quantizer, torch.cat([rank_tokens(0), rank_tokens(1)])).item()
    alone = codebook_entropy(model.quantizer, rank_tokens(0)).item()
    assert values[0] == pytest.approx(together, rel=1e-5) and values[1] == pytest.approx(together, rel=1e-5)
    assert alone != pytest.approx(together, rel=1e-3)


def test_latent_shape_follows_the_config() -> None:
    cfg = build_config("default")
    model = VideoTokenizer(cfg.model, cfg.data)
    assert model.codebook_size == 2**10
    assert model.latent_shape() == (16 // 4, 64 // 4, 64 // 4)
    smoke, _ = make_model("smoke")
    assert smoke.latent_shape() == (4, 8, 8)  # temporal_downsample 0: one latent frame per frame
    assert build_config("small").model.temporal_downsample == 0  # no two frames share a latent: no ghosts


@pytest.mark.parametrize("preset", PRESETS)
def test_encode_decode_roundtrip(preset: str) -> None:
    model, _ = make_model(preset)
    video = videos_for(model)
    codes = model.encode(video)
    assert codes.shape == (2, *model.latent_shape()) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < model.codebook_size
    recon = model.decode(codes)
    assert recon.shape == video.shape
    assert 0.0 <= recon.min() and recon.max() <= 1.0


def test_encode_and_decode_match_forward_in_either_mode() -> None:
    model, _ = make_model("smoke")
    video = videos_for(model)
    model.train()
    train_codes = model.encode(video)
    assert model.training and model.quantizer.training and model.encoder.training  # encode restores the mode it found
    model.eval()
    with torch.no_grad():
        out = model(video)
    assert torch.equal(model.encode(video), out.codes)
    assert torch.equal(train_codes, out.codes)
    torch.testing.assert_close(model.decode(out.codes), out.recon)
    assert out.entropy_loss == 0 and out.commitment_loss == 0  # eval mode: no aux losses


def test_wrong_input_shape_is_refused() -> None:
    model, _ = make_model("smoke")
    with pytest.raises(ValueError, match="expected video"):
        model(torch.zeros(1, 1, 4, 8, 8))
    with pytest.raises(ValueError, match="expected codes"):
        model.decode(torch.zeros(1, 2, 4, 4, dtype=torch.int64))


@pytest.mark.parametrize("preset", PRESETS)
def test_gradients_reach_the_first_encoder_conv(preset: str) -> None:
    model, model_cfg = make_model(preset)
    video = videos_for(model)
    loss, parts = compute_loss(model(video), video, model_cfg)
    loss.backward()
    first_conv = model.encoder.layers[0]
    assert isinstance(first_conv, torch.nn.Conv3d)
    grad = first_conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert set(parts) == {"loss", "recon", "entropy", "commitment", "background", "mse"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in parts.values())
    expected = (
        parts["recon"]
        + model_cfg.entropy_loss_weight * parts["entropy"]
        + model_cfg.commitment_loss_weight * parts["commitment"]
        + model_cfg.background_code_weight * parts["background"]
    )
    assert parts["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def gradients_of_one_step(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model, model_cfg = make_model("smoke", seed=seed)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    video = videos_for(model, batch=4)
    loss, _ = compute_loss(model(video), video, model_cfg)
    loss.backward()
    return weights, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_same_seed_gives_identical_weights_and_bit_identical_gradients() -> None:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        weights_a, grads_a = gradients_of_one_step(seed=0)
        weights_b, grads_b = gradients_of_one_step(seed=0)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    weights_c, _ = gradients_of_one_step(seed=1)
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


def test_reconstruction_loss_makes_all_black_lose() -> None:
    model_cfg = ModelConfig()
    target = sparse_videos(4, 8, 32, 32, seed=3)
    is_object = target > model_cfg.foreground_threshold
    assert is_object.float().mean() < 0.05  # as sparse as the real frames

    all_black = torch.zeros_like(target)
    object_with_haze = torch.where(is_object, target, torch.full_like(target, 0.1))

    # Plain MSE prefers the output that misses the object entirely...
    assert F.mse_loss(all_black, target) < F.mse_loss(object_with_haze, target)
    # ...the balanced loss prefers the one that gets the object right.
    assert reconstruction_loss(object_with_haze, target, model_cfg) < reconstruction_loss(all_black, target, model_cfg)
    assert reconstruction_loss(target, target, model_cfg) == 0


def test_reconstruction_loss_weights_object_and_background_shares() -> None:
    model_cfg = ModelConfig(foreground_balance=0.5)
    target = torch.zeros(1, 1, 1, 2, 5)
    target[..., 0, 0] = 1.0  # 1 object pixel, 9 background pixels
    recon = torch.full_like(target, 0.2)
    object_mse, background_mse = 0.8**2, 0.2**2
    expected = 0.5 * object_mse + 0.5 * background_mse
    assert reconstruction_loss(recon, target, model_cfg).item() == pytest.approx(expected)


def test_reconstruction_loss_without_object_pixels_is_background_mse() -> None:
    model_cfg = ModelConfig()
    target = torch.zeros(2, 1, 2, 4, 4)
    recon = torch.full_like(target, 0.3)
    assert reconstruction_loss(recon, target, model_cfg).item() == pytest.approx(0.09)


def test_speck_weight_makes_a_speck_cost_what_it_does_to_the_frame() -> None:
    """A 3-pixel speck of 0.3 beside a perfect object: the balanced mean spreads it over every
    background pixel of the frame; the speck term charges its excess summed over the frame."""
    target = sparse_videos(2, 4, 32, 32, seed=3)
    speck = target.clone()
    speck[:, :, :, 0, 0:3] = torch.where(target[:, :, :, 0, 0:3] > 0.05, target[:, :, :, 0, 0:3], 0.3)
    plain = reconstruction_loss(speck, target, ModelConfig()).item()
    weighted = reconstruction_loss(speck, target, ModelConfig(speck_weight=1.0)).item()
    assert plain < 1e-3
    # 3 pixels a frame, each 0.25 above the foreground threshold of 0.05.
    assert weighted - plain == pytest.approx(3 * 0.25**2, rel=0.05)
    # Black background, and object pixels however wrong, cost nothing extra.
    dim_object = torch.where(target > 0.05, target * 0.5, target)
    assert reconstruction_loss(dim_object, target, ModelConfig(speck_weight=1.0)).item() == pytest.approx(
        reconstruction_loss(dim_object, target, ModelConfig()).item())


def test_codebook_stats_on_crafted_codes() -> None:
    size = 64
    same = codebook_stats(torch.full((4, 2, 8, 8), 7, dtype=torch.int64), size)
    assert same["usage"] == pytest.approx(1 / size)
    assert same["perplexity"] == pytest.approx(1.0)
    uniform = codebook_stats(torch.arange(size).repeat(3).reshape(3, 1, 8, 8), size)
    assert uniform["usage"] == pytest.approx(1.0)
    assert uniform["perplexity"] == pytest.approx(size)
    half = codebook_stats(torch.arange(size // 2), size)
    assert half["usage"] == pytest.approx(0.5)
    assert half["perplexity"] == pytest.approx(size / 2)


# --- output, upsampling and loss choices (issue #12) ----------------------------------------


def test_clamp_output_is_exactly_black_and_passes_gradients_straight_through() -> None:
    x = torch.tensor([-2.0, -0.1, 0.0, 0.3, 1.0, 1.7], requires_grad=True)
    y = output_activation(x, "clamp")
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.3, 1.0, 1.0])
    target = torch.tensor([0.0, 0.5, 0.0, 0.3, 1.0, 1.0])
    F.mse_loss(y, target, reduction="sum").backward()
    # Only the pixel that is dark but should be bright has an error, and it gets its gradient
    # although its pre-activation is below 0 (a plain clamp would give it none).
    assert x.grad.tolist() == pytest.approx([0.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    assert output_activation(torch.tensor([-30.0]), "sigmoid").item() > 0  # sigmoid never reaches black


@pytest.mark.parametrize("temporal", [True, False])
def test_subpixel_upsampling_starts_as_repetition_and_can_draw_each_frame_differently(temporal: bool) -> None:
    torch.manual_seed(0)
    subpixel = Upsample(4, 3, temporal, "subpixel")
    repeat = Upsample(4, 3, temporal, "repeat")
    positions = 8 if temporal else 4
    with torch.no_grad():  # ICNR: the subpixel conv's sub-positions share the repeat conv's kernel
        repeat.conv.weight.copy_(subpixel.conv.weight[::positions])
        repeat.conv.bias.copy_(subpixel.conv.bias[::positions])
    x = torch.randn(2, 4, 2, 3, 3)
    expected_shape = (2, 3, 4 if temporal else 2, 6, 6)
    assert subpixel(x).shape == repeat(x).shape == expected_shape
    torch.testing.assert_close(subpixel(x), repeat(x))
    # Once trained apart, the two frames (or pixels) of one latent voxel differ: no forced ghost.
    with torch.no_grad():
        subpixel.conv.weight[1::positions] += 1.0
    out = subpixel(x)
    first, second = (out[:, :, 0::2], out[:, :, 1::2]) if temporal else (out[..., 0::2, :], out[..., 1::2, :])
    assert not torch.allclose(first, second)


def test_l1_reconstruction_loss_balances_absolute_errors() -> None:
    model_cfg = ModelConfig(foreground_balance=0.25, recon_loss="l1")
    target = torch.zeros(1, 1, 1, 2, 5)
    target[..., 0, 0] = 1.0  # 1 object pixel, 9 background pixels
    recon = torch.full_like(target, 0.2)
    expected = 0.25 * 0.8 + 0.75 * 0.2
    assert reconstruction_loss(recon, target, model_cfg).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "key, value", [("model.output", "tanh"), ("model.upsample", "transposed"), ("model.recon_loss", "huber")]
)
def test_unknown_model_choices_are_refused_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: expected one of"):
        build_config("small", overrides=[f"{key}={value}"])


def test_runs_from_before_the_choices_existed_rebuild_their_model() -> None:
    # A config.json without the new keys means the model those runs trained: sigmoid, repetition, MSE.
    cfg = build_config("small").to_dict()
    for key in ("output", "upsample", "recon_loss"):
        del cfg["model"][key]
    old = config_from_dict(cfg).model
    assert (old.output, old.upsample, old.recon_loss) == ("sigmoid", "repeat", "mse")


@pytest.mark.parametrize("norm", ["channel", "batch", "none"])
def test_a_black_video_encodes_to_one_code_everywhere_with_context_free_layers(norm):
    """Per-voxel (or eval-mode batch) norms and replicate padding keep a constant clip constant
    through the encoder: black is one code, whatever the weights. GroupNorm over the clip and zero
    padding (the older layers) make the border and the rest of the clip differ."""
    overrides = ["model.padding=replicate", f"model.norm={norm}", "model.temporal_downsample=1",
                 "model.channel_mults=1,2,2", "model.codebook_bits=10"]
    cfg = build_config("small", None, overrides)
    torch.manual_seed(0)
    model = VideoTokenizer(cfg.model, cfg.data).eval()
    black = torch.zeros(2, 1, cfg.data.frames, cfg.data.height, cfg.data.width)
    codes = model.encode(black)
    assert codes.shape == (2, *model.latent_shape()) and codes.unique().numel() == 1
    older = VideoTokenizer(build_config("small", None, ["model.padding=zeros", "model.norm=group", *overrides[2:]]).model,
                           cfg.data).eval()
    assert older.encode(black).unique().numel() > 1


def test_the_demo_tokenizer_encodes_a_black_video_to_one_code_before_and_after_a_training_step():
    """The `small` preset as `make demo` trains it: black is one code everywhere, from the start
    and after the weights (and BatchNorm's running statistics) have moved."""
    cfg = build_config("small")
    torch.manual_seed(0)
    model = VideoTokenizer(cfg.model, cfg.data)
    black = torch.zeros(2, 1, cfg.data.frames, cfg.data.height, cfg.data.width)
    assert model.eval().encode(black).unique().numel() == 1
    videos = sparse_videos(4, cfg.data.frames, cfg.data.height, cfg.data.width, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compute_loss(model.train()(videos), videos, cfg.model)[0].backward()
    optimizer.step()
    assert model.eval().encode(black).unique().numel() == 1


def test_entropy_on_object_cells_only_trains_and_ignores_a_clip_without_object():
    cfg = build_config("smoke", None, ["model.entropy_on=object", "model.padding=replicate", "model.norm=channel"])
    torch.manual_seed(0)
    model = VideoTokenizer(cfg.model, cfg.data).train()
    videos = torch.zeros(2, 1, cfg.data.frames, cfg.data.height, cfg.data.width)
    videos[0, 0, :, 4:6, 4:6] = 1.0  # one clip with an object, one black
    out = model(videos)
    loss, parts = compute_loss(out, videos, cfg.model)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in parts.values())
    empty = model(torch.zeros_like(videos))
    assert torch.isfinite(empty.entropy_loss).all()


@pytest.mark.parametrize("time, sees_after, sees_before", [
    ("frame", False, False), ("causal", False, True), ("centered", True, True)])
def test_what_of_the_clip_a_frames_codes_see(time, sees_after, sees_before):
    """model.encoder_time: with ``frame`` a frame's codes come from that frame alone; with
    ``causal`` from it and the frames before it, never the ones after (a prediction's given codes
    cannot see the future it is scored on); ``centered`` (the older encoder) sees both sides."""
    videos = sparse_videos(2, 8, 32, 32, seed=2)
    later, earlier = videos.clone(), videos.clone()
    later[:, :, 5:] = sparse_videos(2, 8, 32, 32, seed=3)[:, :, 5:]  # other frames from frame 5 on
    earlier[:, :, :3] = sparse_videos(2, 8, 32, 32, seed=3)[:, :, :3]  # other frames before frame 3
    cfg = build_config("small", None, [f"model.encoder_time={time}"])
    torch.manual_seed(0)
    model = VideoTokenizer(cfg.model, cfg.data).eval()
    codes = model.encode(videos)
    assert (not torch.equal(codes[:, :5], model.encode(later)[:, :5])) is sees_after
    assert (not torch.equal(codes[:, 3:], model.encode(earlier)[:, 3:])) is sees_before


def test_an_encoder_that_sees_each_frame_alone_cannot_halve_time():
    with pytest.raises(ConfigError, match="^model.encoder_time"):
        build_config("small", None, ["model.encoder_time=frame", "model.temporal_downsample=1"])
    with pytest.raises(ConfigError, match="^model.encoder_time"):
        build_config("small", None, ["model.encoder_time=both"])
    build_config("small", None, ["model.encoder_time=causal", "model.temporal_downsample=1"])


def test_the_background_code_term_charges_wrong_bits_of_cells_without_object_pixels_only():
    """``model.background_code_weight``: a latent cell whose pixels are all at most the foreground
    threshold pays ``relu(1 - z * b)`` for each bit, where ``b`` is the bits of the most common
    code of such cells in the batch; cells with object pixels pay nothing."""
    cfg = build_config("small", None, ["model.encoder_time=frame", "model.background_code_weight=1"])
    model = VideoTokenizer(cfg.model, cfg.data)
    videos = torch.zeros(1, 1, cfg.data.frames, cfg.data.height, cfg.data.width)
    videos[0, 0, 0, 0, 0] = 1.0  # an object pixel in the first cell of the first frame
    t, h, w = model.latent_shape()
    bits = cfg.model.codebook_bits
    codes = torch.full((1, t, h, w), 7)  # the cells' codes: which one is most common matters
    background_bits = model.quantizer.codebook[7]
    latent = background_bits.view(1, bits, 1, 1, 1).expand(1, bits, t, h, w).clone()
    assert model._background_code_loss(latent, codes, videos) == 0
    latent[0, :, 0, 0, 0] = -background_bits  # the object's cell: free to differ
    assert model._background_code_loss(latent, codes, videos) == 0
    latent[0, 0, 1, 0, 0] = 0.5 * background_bits[0]  # a background cell's first bit: right side, inside the margin
    latent[0, 1, 2, 0, 0] = -background_bits[1]  # another's second bit, on the wrong side
    cells = t * h * w - 1
    assert model._background_code_loss(latent, codes, videos).item() == pytest.approx((0.5 + 2.0) / cells)


def test_training_on_the_background_code_term_gives_the_cells_around_the_object_the_background_code():
    cfg = build_config("small", None, ["model.encoder_time=frame", "model.background_code_weight=1"])
    torch.manual_seed(0)
    model = VideoTokenizer(cfg.model, cfg.data).train()
    with torch.no_grad():  # a head that scatters: cells near the object get codes of their own
        model.encoder.layers[-1][-1].weight.mul_(30.0)
    videos = sparse_videos(4, cfg.data.frames, cfg.data.height, cfg.data.width, seed=5)
    objects = model.object_cells(videos, cfg.model.foreground_threshold)

    def off_background_cells() -> int:
        codes = model(videos).codes[~objects]
        return int((codes != torch.bincount(codes).argmax()).sum())

    before = off_background_cells()
    assert before > 0
    optimizer = torch.optim.Adam(model.encoder.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        model(videos).background_loss.backward()
        optimizer.step()
    assert off_background_cells() < before / 4
    assert model.eval()(videos).background_loss == 0  # a training term only, like LFQ's
