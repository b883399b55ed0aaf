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
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import LFQ
from vector_quantize_pytorch.lookup_free_quantization import LossBreakdown

from job.config import Config, DataConfig, ModelConfig

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


# --- building blocks ------------------------------------------------------------------------


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each voxel on its own (``model.norm = channel``): unlike
    GroupNorm, no statistic is shared across positions, so what a black region encodes to cannot
    depend on an object elsewhere in the clip, and a constant input stays constant."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def _norm(channels: int, kind: str = "group") -> nn.Module:
    """``model.norm``: ``group`` (GroupNorm: statistics over the whole clip), ``channel`` (per
    voxel, ChannelNorm) or ``none``."""
    if kind == "group":
        # 32 groups is the usual choice; the small presets have fewer channels than that, and any
        # divisor of the channel count keeps the layer valid.
        return nn.GroupNorm(math.gcd(channels, 32), channels)
    if kind == "channel":
        return ChannelNorm(channels)
    if kind == "batch":
        # Statistics of the batch in training, its running averages (a fixed per-channel affine map,
        # the same for every voxel and clip) in eval mode, where encode() runs.
        return nn.BatchNorm3d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


class CausalConv3d(nn.Conv3d):
    """A 3x3x3 conv whose output frame t sees input frames t-2..t only: the clip is padded before
    its first frame (by the padding mode) and not after its last."""

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int, int], padding: str) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, stride=stride, padding=(0, 1, 1), padding_mode=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        front = self.kernel_size[0] - 1
        if self.padding_mode == "zeros":
            return super().forward(F.pad(x, (0, 0, 0, 0, front, 0)))
        return super().forward(F.pad(x, (0, 0, 0, 0, front, 0), mode=self.padding_mode))


def _conv3(
    in_channels: int, out_channels: int, stride: tuple[int, int, int] = (1, 1, 1), padding: str = "zeros",
    time: str = "centered",
) -> nn.Conv3d:
    # ``model.padding``: ``replicate`` extends a constant input by itself, so a black clip stays
    # one constant latent up to the border; ``zeros`` makes the border differ from the interior.
    if time == "causal":
        return CausalConv3d(in_channels, out_channels, stride, padding)
    time_kernel = 1 if time == "frame" else 3
    return nn.Conv3d(in_channels, out_channels, kernel_size=(time_kernel, 3, 3), stride=stride,
                     padding=(time_kernel // 2, 1, 1), padding_mode=padding)


def _scale_factors(temporal: bool) -> tuple[int, int, int]:
    return (2 if temporal else 1, 2, 2)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, plus a (projected) skip connection."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str = "group", padding: str = "zeros", time: str = "centered"
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(in_channels, norm),
            nn.SiLU(),
            _conv3(in_channels, out_channels, padding=padding, time=time),
            _norm(out_channels, norm),
            nn.SiLU(),
            _conv3(out_channels, out_channels, padding=padding, time=time),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Downsample(nn.Module):
    """Strided 3x3x3 conv: halves H and W, and T when ``temporal``."""

    def __init__(self, channels: int, temporal: bool, padding: str = "zeros", time: str = "centered") -> None:
        super().__init__()
        self.conv = _conv3(channels, channels, stride=_scale_factors(temporal), padding=padding, time=time)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Doubles H and W, and T when ``temporal``, in one of two ways (``model.upsample``):

    - ``repeat``: a 3x3x3 conv at the lower resolution, then nearest-neighbour repetition. Every
      sub-position of a latent voxel gets the same feature vector, so where two frames share one
      latent (temporal downsampling) both frames are drawn from one vector: the decoder shows the
      object of one frame as a ghost in the other.
    - ``subpixel``: a 3x3x3 conv to ``out_channels`` per sub-position, then depth-to-space (a
      "pixel shuffle" in 3D): every output frame and pixel gets features of its own. The conv is
      initialised as ICNR (Aitken et al. 2017): all sub-positions start with identical weights, so
      a fresh layer computes exactly what ``repeat`` does and cannot start with checkerboards.

    Both run their conv at the lower resolution, where it is 4-8x cheaper, and both end in an
    expand/permute + reshape, whose backward is a plain gather or sum: deterministic on every device.
    """

    def __init__(
        self, in_channels: int, out_channels: int, temporal: bool, mode: str = "repeat", padding: str = "zeros"
    ) -> None:
        super().__init__()
        self.factors = _scale_factors(temporal)
        self.mode = mode
        self.out_channels = out_channels
        if mode == "subpixel":
            positions = math.prod(self.factors)
            self.conv = _conv3(in_channels, out_channels * positions, padding=padding)
            with torch.no_grad():  # ICNR: one kernel per output channel, shared by its sub-positions
                self.conv.weight.copy_(self.conv.weight[:out_channels].repeat_interleave(positions, dim=0))
                self.conv.bias.copy_(self.conv.bias[:out_channels].repeat_interleave(positions, dim=0))
        elif mode == "repeat":
            self.conv = _conv3(in_channels, out_channels, padding=padding)
        else:
            raise ValueError(f"unknown upsample mode {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        b, _, t, h, w = x.shape
        ft, fh, fw = self.factors
        c = self.out_channels
        if self.mode == "subpixel":
            # Channel c * (ft*fh*fw) + sub-position -> that sub-position of channel c.
            shuffled = x.reshape(b, c, ft, fh, fw, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
            return shuffled.reshape(b, c, t * ft, h * fh, w * fw)
        repeated = x[:, :, :, None, :, None, :, None].expand(b, c, t, ft, h, fh, w, fw)
        return repeated.reshape(b, c, t * ft, h * fh, w * fw)


def _stage_widths(model: ModelConfig) -> list[int]:
    return [model.channels * mult for mult in model.channel_mults]


def _is_temporal(downsampling_index: int, model: ModelConfig) -> bool:
    # The first `temporal_downsample` resolution changes (counted from the input) also halve T.
    return downsampling_index < model.temporal_downsample


def _output_head(in_channels: int, out_channels: int, norm: str = "group") -> nn.Sequential:
    # A 1x1x1 conv: the residual block before it already mixes neighbours, and oneDNN runs a
    # 3x3x3 conv to a single output channel far slower than its arithmetic suggests
    # (docs/benchmarks.md, "Why the code is as it is").
    return nn.Sequential(_norm(in_channels, norm), nn.SiLU(), nn.Conv3d(in_channels, out_channels, kernel_size=1))


class Encoder(nn.Module):
    """Stem conv, then per stage its residual blocks (the first one widens) and a downsampling."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        widths = _stage_widths(model)
        norm, padding, time = model.norm, model.padding, model.encoder_time
        layers: list[nn.Module] = [_conv3(1, widths[0], padding=padding, time=time)]
        channels = widths[0]
        for stage, width in enumerate(widths):
            for _ in range(model.res_blocks):
                layers.append(ResBlock(channels, width, norm, padding, time))
                channels = width
            if stage < len(widths) - 1:
                layers.append(Downsample(width, _is_temporal(stage, model), padding, time))
        layers.append(_output_head(widths[-1], model.codebook_bits, norm))
        self.layers = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.layers(video)


class Decoder(nn.Module):
    """Mirror of the encoder, deepest stage first; each upsampling narrows to the next stage's width."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        widths = _stage_widths(model)
        norm, padding = model.decoder_norm, model.decoder_padding
        layers: list[nn.Module] = [_conv3(model.codebook_bits, widths[-1], padding=padding)]
        for stage in reversed(range(len(widths))):
            if stage < len(widths) - 1:
                # Undoes the encoder's downsampling between this stage and the next one.
                layers.append(
                    Upsample(widths[stage + 1], widths[stage], _is_temporal(stage, model), model.upsample, padding)
                )
            layers.extend(ResBlock(widths[stage], widths[stage], norm, padding) for _ in range(model.res_blocks))
        head = _output_head(widths[0], 1, norm)
        with torch.no_grad():  # a shift, not a draw: the other weights stay what the seed makes them
            head[-1].bias.add_(model.output_bias_init)
        layers.append(head)
        self.layers = nn.Sequential(*layers)
        self.output = model.output

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return output_activation(self.layers(latent), self.output)


def output_activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The decoder's last step, mapping its output to [0, 1] (``model.output``).

    - ``sigmoid``: smooth, but it reaches 0 only at -infinity: a black background ends as a faint
      haze whose SSIM luminance term is far from 1 (0.02 instead of 0 scores about 0.2).
    - ``clamp``: clamp to [0, 1] with a straight-through gradient (the gradient of the identity).
      Black is exactly 0 for any output <= 0, so the background can be right, not nearly right;
      and a pixel clamped to 0 that should be bright still gets the gradient that raises it (a
      plain clamp would give it none).
    """
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "clamp":
        return x + (x.clamp(0.0, 1.0) - x).detach()
    raise ValueError(f"unknown output activation {kind!r}")


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode for a moment, restoring its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# --- the tokenizer --------------------------------------------------------------------------


class VideoTokenizer(nn.Module):
    def __init__(self, model: ModelConfig, data: DataConfig) -> None:
        super().__init__()
        self.config = model
        self.input_shape = (data.frames, data.height, data.width)
        self.codebook_size = 2**model.codebook_bits
        self.encoder = Encoder(model)
        # The library's own loss weighting and diversity_gamma are bypassed: forward reads the
        # unweighted parts from the loss breakdown and combines them with the config's values.
        # commitment_loss_weight only has to be > 0 for LFQ to compute the commitment term.
        self.quantizer = LFQ(
            dim=model.codebook_bits,
            codebook_size=self.codebook_size,
            entropy_loss_weight=1.0,
            commitment_loss_weight=1.0,
            frac_per_sample_entropy=1.0,
        )
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
        quantized, codes, breakdown = self._quantize(latent)
        batch_entropy = breakdown.batch_entropy
        if self.config.entropy_on == "object" and self.training:
            # The diversity bonus over the latent cells that hold an object pixel only: it spreads
            # the object's codes and gives black nothing to scatter. (Confidence and commitment
            # still apply everywhere: they pin the background to its code.)
            mask = self.object_cells(video, self.config.foreground_threshold)
            batch_entropy = self._codebook_entropy(latent.movedim(1, -1)[mask])
        entropy_loss = breakdown.per_sample_entropy - self.config.diversity_gamma * batch_entropy
        background_loss = latent.new_zeros(())
        if self.config.background_code_weight and self.training:
            background_loss = self._background_code_loss(latent, codes, video)
        return TokenizerOutput(
            recon=self.decoder(quantized),
            codes=codes,
            entropy_loss=entropy_loss,
            commitment_loss=breakdown.commitment,
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
            _, codes, _ = self._quantize(self.encoder(video))
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Video (B, 1, T, H, W) in [0, 1] from integer codes (B, t, h, w)."""
        if codes.ndim != 4 or tuple(codes.shape[1:]) != self.latent_shape():
            t, h, w = self.latent_shape()
            raise ValueError(f"expected codes of shape (B, {t}, {h}, {w}), got {tuple(codes.shape)}")
        return self.decoder(self.quantizer.indices_to_codes(codes))

    def _codebook_entropy(self, tokens: torch.Tensor) -> torch.Tensor:
        """Entropy of the mean soft code assignment of ``tokens`` (N, bits), as LFQ computes its
        batch entropy (distance -2 x.c, softmax at LFQ_INV_TEMPERATURE); 0 for no tokens."""
        if not len(tokens):
            return tokens.sum() * 0.0
        codebook = self.quantizer.codebook.to(tokens.dtype)
        prob = (2.0 * LFQ_INV_TEMPERATURE * tokens @ codebook.T).softmax(dim=-1).mean(dim=0)
        return -(prob * prob.clamp(min=1e-5).log()).sum()

    def _quantize(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, LossBreakdown]:
        (quantized, codes, _), breakdown = self.quantizer(
            latent, inv_temperature=LFQ_INV_TEMPERATURE, return_loss_breakdown=True
        )
        return quantized, codes.long(), breakdown

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


def initial_tokenizer(cfg: Config) -> VideoTokenizer:
    """The weights a run starts from: a pure function of the seed."""
    torch.manual_seed(cfg.seed)
    return VideoTokenizer(cfg.model, cfg.data)


def tokenizer_parameters(cfg: Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in VideoTokenizer(cfg.model, cfg.data).parameters())
