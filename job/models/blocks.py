"""The tokenizer's layers (job/models/tokenizer.py assembles them): norms, 3x3x3 convolutions
with a choice of padding and of what in time they see, residual blocks, down- and upsampling,
the output head and the decoder's last activation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def norm_layer(channels: int, kind: str = "group") -> nn.Module:
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
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode  # F.pad's name for zeros
        return super().forward(F.pad(x, (0, 0, 0, 0, self.kernel_size[0] - 1, 0), mode=mode))


def conv3(
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
            norm_layer(in_channels, norm),
            nn.SiLU(),
            conv3(in_channels, out_channels, padding=padding, time=time),
            norm_layer(out_channels, norm),
            nn.SiLU(),
            conv3(out_channels, out_channels, padding=padding, time=time),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Downsample(nn.Module):
    """Strided 3x3x3 conv: halves H and W, and T when ``temporal``."""

    def __init__(self, channels: int, temporal: bool, padding: str = "zeros", time: str = "centered") -> None:
        super().__init__()
        self.conv = conv3(channels, channels, stride=_scale_factors(temporal), padding=padding, time=time)

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
            self.conv = conv3(in_channels, out_channels * positions, padding=padding)
            with torch.no_grad():  # ICNR: one kernel per output channel, shared by its sub-positions
                self.conv.weight.copy_(self.conv.weight[:out_channels].repeat_interleave(positions, dim=0))
                self.conv.bias.copy_(self.conv.bias[:out_channels].repeat_interleave(positions, dim=0))
        elif mode == "repeat":
            self.conv = conv3(in_channels, out_channels, padding=padding)
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


def output_head(in_channels: int, out_channels: int, norm: str = "group") -> nn.Sequential:
    # A 1x1x1 conv: the residual block before it already mixes neighbours, and oneDNN runs a
    # 3x3x3 conv to a single output channel far slower than its arithmetic suggests
    # (docs/benchmarks.md, "Why the code is as it is").
    return nn.Sequential(norm_layer(in_channels, norm), nn.SiLU(), nn.Conv3d(in_channels, out_channels, kernel_size=1))


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
