"""A MAGVIT-style video tokenizer: 3D-conv encoder, lookup-free quantization (LFQ), 3D-conv decoder.

The encoder maps a grey video (B, 1, T, H, W) in [0, 1] to ``codebook_bits`` channels per latent
voxel; LFQ turns each channel into one bit, so every latent voxel is one integer code in
[0, 2**codebook_bits). The decoder maps the +-1 bit vectors back to a video.

Determinism: nothing here draws random numbers after construction (no dropout; LFQ with
``frac_per_sample_entropy=1`` uses every token instead of a random subset), and every op has a
deterministic CPU kernel, so a kill/resume reproduces the weights byte for byte.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol
from vector_quantize_pytorch import LFQ

from job.config import Config, DataConfig, ModelConfig
from job.models.blocks import Downsample, ResBlock, Upsample, conv3, output_activation, output_head

# Sharpness of LFQ's soft code assignment in its entropy terms. The library's default, pinned
# here so that a new library default cannot silently change the math of a resumed run.
LFQ_INV_TEMPERATURE = 100.0


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # (B, 1, T, H, W) in [0, 1]
    codes: torch.Tensor  # (B, t, h, w) int64 in [0, 2**codebook_bits)
    entropy_loss: torch.Tensor  # per-sample entropy - diversity_gamma * batch entropy, unweighted
    commitment_loss: torch.Tensor  # unweighted; zero outside training mode
    background_loss: torch.Tensor  # unweighted (model.background_code_weight); zero outside training mode


# --- the encoder and the decoder ---------------------------------------------------------


def _stage_widths(model: ModelConfig) -> list[int]:
    return [model.channels * mult for mult in model.channel_mults]


def _is_temporal(downsampling_index: int, model: ModelConfig) -> bool:
    # The first `temporal_downsample` resolution changes (counted from the input) also halve T.
    return downsampling_index < model.temporal_downsample


class Encoder(nn.Module):
    """Stem conv, then per stage its residual blocks (the first one widens) and a downsampling."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        widths = _stage_widths(model)
        norm, padding, time = model.norm, model.padding, model.encoder_time
        layers: list[nn.Module] = [conv3(1, widths[0], padding=padding, time=time)]
        channels = widths[0]
        for stage, width in enumerate(widths):
            for _ in range(model.res_blocks):
                layers.append(ResBlock(channels, width, norm, padding, time))
                channels = width
            if stage < len(widths) - 1:
                layers.append(Downsample(width, _is_temporal(stage, model), padding, time))
        layers.append(output_head(widths[-1], model.codebook_bits, norm))
        self.layers = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.layers(video)


class Decoder(nn.Module):
    """Mirror of the encoder, deepest stage first; each upsampling narrows to the next stage's width."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        widths = _stage_widths(model)
        norm, padding = model.decoder_norm, model.decoder_padding
        layers: list[nn.Module] = [conv3(model.codebook_bits, widths[-1], padding=padding)]
        for stage in reversed(range(len(widths))):
            if stage < len(widths) - 1:
                # Undoes the encoder's downsampling between this stage and the next one.
                layers.append(
                    Upsample(widths[stage + 1], widths[stage], _is_temporal(stage, model), model.upsample, padding)
                )
            layers.extend(ResBlock(widths[stage], widths[stage], norm, padding) for _ in range(model.res_blocks))
        head = output_head(widths[0], 1, norm)
        with torch.no_grad():  # a shift, not a draw: the other weights stay what the seed makes them
            head[-1].bias.add_(model.output_bias_init)
        layers.append(head)
        self.layers = nn.Sequential(*layers)
        self.output = model.output

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return output_activation(self.layers(latent), self.output)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode for a moment, restoring its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class LfqTerms(NamedTuple):
    quantized: torch.Tensor  # the +-1 bits, with the straight-through gradient
    codes: torch.Tensor  # (B, t, h, w) int64
    per_sample_entropy: torch.Tensor
    batch_entropy: torch.Tensor
    commitment: torch.Tensor


def lfq_training_terms(quantizer: LFQ, latent: torch.Tensor, with_batch: bool) -> LfqTerms:
    """LFQ's training terms of ``latent`` (B, bits, t, h, w), as ``quantizer`` computes them in
    training mode: the bits with a straight-through gradient, the per-token entropy of the soft
    code assignment (softmax of 2 x LFQ_INV_TEMPERATURE x z.c over the codebook), the entropy of
    its mean over the tokens (``with_batch``; else 0) and the commitment. Over a codebook of every
    sign pattern that softmax is a product of one two-way softmax per bit, so the per-token entropy
    is a sum over the bits; the library takes the softmax over all 2**bits codes instead, most of a
    CPU training step of `small`'s tokenizer (docs/benchmarks.md)."""
    bits, codes = quantize(quantizer, latent.detach())
    straight_through = latent + (bits.to(latent.dtype) - latent).detach()
    latent = latent.float()  # as LFQ's force_quantization_f32: the terms in float32 under autocast
    logits = (4.0 * LFQ_INV_TEMPERATURE) * latent  # of bit +1 against bit -1
    probability = torch.sigmoid(logits)
    # H(sigmoid(a)) = p softplus(-a) + (1 - p) softplus(a): finite where p rounds to 0 or 1.
    bit_entropy = probability * F.softplus(-logits) + (1 - probability) * F.softplus(logits)
    per_sample_entropy = bit_entropy.sum(1).mean()
    batch_entropy = latent.new_zeros(())
    if with_batch:
        tokens = latent.movedim(1, -1).reshape(-1, latent.shape[1])
        batch_entropy = codebook_entropy(quantizer, tokens, across_ranks=True)
    commitment = F.mse_loss(latent, bits.float())
    return LfqTerms(straight_through, codes, per_sample_entropy, batch_entropy, commitment)


def codebook_entropy(quantizer: LFQ, tokens: torch.Tensor, across_ranks: bool = False) -> torch.Tensor:
    """Entropy of the mean soft code assignment of ``tokens`` (N, bits), as LFQ computes its
    batch entropy (distance -2 x.c, softmax at LFQ_INV_TEMPERATURE); 0 for no tokens. With
    ``across_ranks``, the mean is over every DDP rank's tokens, as LFQ means it (every rank must
    call it then, so it needs tokens on every rank)."""
    if not len(tokens):
        return tokens.sum() * 0.0
    codebook = quantizer.codebook.to(tokens.dtype)
    prob = (2.0 * LFQ_INV_TEMPERATURE * tokens @ codebook.T).softmax(dim=-1).mean(dim=0)
    if across_ranks:
        prob = _mean_over_ranks(prob)
    return -(prob * prob.clamp(min=1e-5).log()).sum()


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the DDP ranks, differentiable. LFQ 1.32's own helper divides by
    the world size without the sum (``torch.distributed.nn``'s all_reduce returns the sum and
    leaves its argument as it was); functional collectives are what torch points to instead."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    return funcol.all_reduce(values, "sum", dist.group.WORLD) / dist.get_world_size()


def quantize(quantizer: LFQ, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LFQ in eval mode: the +-1 bits of ``latent`` (B, bits, t, h, w) and the codes (B, t, h, w)."""
    with _eval_mode(quantizer):
        bits, codes, _ = quantizer(latent, inv_temperature=LFQ_INV_TEMPERATURE)
    return bits, codes.long()


# --- the tokenizer --------------------------------------------------------------------------


class VideoTokenizer(nn.Module):
    def __init__(self, model: ModelConfig, data: DataConfig) -> None:
        super().__init__()
        self.config = model
        self.input_shape = (data.frames, data.height, data.width)
        self.codebook_size = 2**model.codebook_bits
        self.encoder = Encoder(model)
        # LFQ quantizes (in eval mode: the codes and their +-1 bits); the training terms come from
        # lfq_training_terms, weighted by the config's values.
        self.quantizer = LFQ(dim=model.codebook_bits, codebook_size=self.codebook_size)
        self.decoder = Decoder(model)

    def latent_shape(self) -> tuple[int, int, int]:
        frames, height, width = self.input_shape
        spatial = 2 ** (len(self.config.channel_mults) - 1)
        return frames // 2**self.config.temporal_downsample, height // spatial, width // spatial

    def object_cells(self, video: torch.Tensor, threshold: float) -> torch.Tensor:
        """(B, t, h, w) bool: the latent cells whose part of ``video`` (B, 1, T, H, W) holds an
        object pixel (one brighter than ``threshold``)."""
        self._check_video(video)
        t, h, w = self.latent_shape()
        frames, height, width = self.input_shape
        bright = (video > threshold).float()
        return F.max_pool3d(bright, (frames // t, height // h, width // w))[:, 0] > 0

    def forward(self, video: torch.Tensor) -> TokenizerOutput:
        self._check_video(video)
        latent = self.encoder(video)
        zero = latent.new_zeros(())
        if not self.training:  # as LFQ: no loss terms outside training
            quantized, codes = quantize(self.quantizer, latent)
            return TokenizerOutput(self.decoder(quantized), codes, zero, zero, zero)
        diverse, object_only = bool(self.config.diversity_gamma), self.config.entropy_on == "object"
        terms = lfq_training_terms(self.quantizer, latent, with_batch=diverse and not object_only)
        batch_entropy = terms.batch_entropy
        if diverse and object_only:
            # The diversity bonus over the latent cells that hold an object pixel only: it spreads
            # the object's codes and gives black nothing to scatter. (Confidence and commitment
            # still apply everywhere: they pin the background to its code.)
            mask = self.object_cells(video, self.config.foreground_threshold)
            batch_entropy = codebook_entropy(self.quantizer, latent.movedim(1, -1)[mask])
        background_loss = zero
        if self.config.background_code_weight:
            background_loss = self._background_code_loss(latent, terms.codes, video)
        return TokenizerOutput(
            recon=self.decoder(terms.quantized),
            codes=terms.codes,
            entropy_loss=terms.per_sample_entropy - self.config.diversity_gamma * batch_entropy,
            commitment_loss=terms.commitment,
            background_loss=background_loss,
        )

    def _background_code_loss(self, latent: torch.Tensor, codes: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """Mean over the cells without object pixels of the hinge ``relu(1 - z * b)`` summed over
        the bits, where ``b`` (+-1) is the bits of those cells' most common code in the batch."""
        background = ~self.object_cells(video, self.config.foreground_threshold)
        if not bool(background.any()):
            return latent.new_zeros(())
        common = torch.bincount(codes[background]).argmax()
        bits = self.quantizer.codebook[common].to(latent.dtype)
        return F.relu(1.0 - latent.movedim(1, -1)[background] * bits).sum(-1).mean()

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Integer codes (B, t, h, w) int64: the codes forward gives in eval mode, whatever mode
        the model is in. Eval mode skips LFQ's entropy terms, which would only cost time here, and
        makes BatchNorm use (and not update) its running statistics, so encoding changes no state."""
        self._check_video(video)
        with _eval_mode(self):
            return quantize(self.quantizer, self.encoder(video))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Video (B, 1, T, H, W) in [0, 1] from integer codes (B, t, h, w)."""
        if codes.ndim != 4 or tuple(codes.shape[1:]) != self.latent_shape():
            t, h, w = self.latent_shape()
            raise ValueError(f"expected codes of shape (B, {t}, {h}, {w}), got {tuple(codes.shape)}")
        return self.decoder(self.quantizer.indices_to_codes(codes))

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 1 or tuple(video.shape[2:]) != self.input_shape:
            frames, height, width = self.input_shape
            raise ValueError(f"expected video of shape (B, 1, {frames}, {height}, {width}), got {tuple(video.shape)}")


# --- losses and statistics ------------------------------------------------------------------


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Foreground-balanced error (``model.recon_loss``: squared or absolute), averaged over the batch.

    Frames are >95% black, so a plain MSE is won by an all-black output. Here the object pixels
    (target > foreground_threshold) of each sample get a fixed share ``foreground_balance`` of
    its loss and the background pixels the rest, whatever their counts: missing the object costs
    as much as a haze over the whole background. A sample without object pixels (or without
    background) gives its whole loss to the part it has.
    """
    difference = recon.float() - target.float()
    error = (difference.abs() if model.recon_loss == "l1" else difference.pow(2)).flatten(1)
    is_object = (target > model.foreground_threshold).flatten(1).to(error.dtype)
    is_background = 1.0 - is_object
    object_error, has_object = _masked_mean(error, is_object)
    background_error, has_background = _masked_mean(error, is_background)
    object_weight = model.foreground_balance * has_object
    background_weight = (1.0 - model.foreground_balance) * has_background
    weighted = object_weight * object_error + background_weight * background_error
    per_sample = weighted / (object_weight + background_weight)
    if model.speck_weight:
        excess = F.relu(recon.float() - model.foreground_threshold).pow(2).flatten(1) * is_background
        per_sample = per_sample + model.speck_weight * excess.sum(1) / recon.shape[2]  # per frame
    return per_sample.mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean of ``values`` where ``mask`` is 1, and whether the row had any such entry."""
    count = mask.sum(dim=1)
    mean = (values * mask).sum(dim=1) / count.clamp(min=1.0)
    return mean, (count > 0).to(values.dtype)


def compute_loss(
    out: TokenizerOutput, target: torch.Tensor, model: ModelConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total training loss and its float parts for logging (``mse`` is plain MSE, for reference)."""
    recon = reconstruction_loss(out.recon, target, model)
    total = (
        recon
        + model.entropy_loss_weight * out.entropy_loss
        + model.commitment_loss_weight * out.commitment_loss
        + model.background_code_weight * out.background_loss
    )
    mse = F.mse_loss(out.recon.detach().float(), target.float())
    # One device-to-host copy for all parts instead of one synchronisation each.
    parts = [total, recon, out.entropy_loss, out.commitment_loss, out.background_loss, mse]
    values = torch.stack(parts).detach().float().tolist()
    return total, dict(zip(("loss", "recon", "entropy", "commitment", "background", "mse"), values, strict=True))


def trained_tokenizer(
    weights: dict[str, torch.Tensor], model: ModelConfig, data: DataConfig, device: torch.device | str = "cpu"
) -> VideoTokenizer:
    """A tokenizer with saved weights, in eval mode: every key must match (strict)."""
    tokenizer = VideoTokenizer(model, data)
    tokenizer.load_state_dict(weights, strict=True)
    return tokenizer.to(device).eval()


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of codebook entries used at least once, and the perplexity of the code histogram."""
    counts = torch.bincount(codes.flatten().long().cpu(), minlength=codebook_size).double()
    probs = counts[counts > 0] / counts.sum()
    entropy = -(probs * probs.log()).sum()
    return {
        "usage": (counts > 0).sum().item() / codebook_size,
        "perplexity": entropy.exp().item(),
    }


def background_code(codes: torch.Tensor) -> int:
    """The background's code: the most common one among ``codes`` (a split's tokens; >95% of the
    cells of these videos are black). Stage 2's object weight and evaluate's code-track judge both
    call every other code the object's."""
    return int(torch.bincount(codes.flatten().long().cpu()).argmax())


def initial_tokenizer(cfg: Config) -> VideoTokenizer:
    """The weights a run starts from: a pure function of the seed."""
    torch.manual_seed(cfg.seed)
    return VideoTokenizer(cfg.model, cfg.data)


def tokenizer_parameters(cfg: Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in VideoTokenizer(cfg.model, cfg.data).parameters())
