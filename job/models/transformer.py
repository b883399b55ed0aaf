"""MAGVIT stage 2 (docs/generation.md): a bidirectional transformer over the frozen tokenizer's codes,
trained with MaskGIT's masked-token objective, and MaskGIT's iterative parallel decoding.

A video is its t x h x w token grid, flattened in time-major order; the blocks see it in patches
of ``stage2.patch`` x ``stage2.patch`` codes of a latent frame (one position each), and the class
(or "none") is an embedding added to every position. One model does three tasks (MAGVIT's
multi-task setup): generation without condition, class-conditional generation, and frame
prediction, where the tokens of the first latent frames are given (visible) and the rest are
masked. Training masks a cosine-scheduled share of the tokens that are not given and learns to
predict them; sampling starts from all of them masked and, over ``steps`` rounds, keeps the most
confident predictions and masks the rest again.

Attention is factorized, as in video transformers such as ViViT and TimeSformer: each block
attends within every latent frame (space), then across frames at every position (time), then
applies its MLP: cheaper than full attention over all tokens (docs/benchmarks.md, "Why the code is
as it is"), and every token still reaches every other in two hops. ``SelfAttention`` is
``nn.MultiheadAttention``'s computation and parameters, with the attention itself written out on the
CPU, where PyTorch's fused kernel is slower on sequences this short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from job.config import Config, Stage2Config
from job.models.maskgit import cosine_schedule, decode, decode_frame_by_frame
from job.models.tokenizer import VideoTokenizer

# Tasks of a training sample, and the class id that means "no class".
UNCONDITIONAL, CLASS_CONDITIONAL, PREDICTION = 0, 1, 2


@dataclass
class MaskedBatch:
    """What the transformer sees and what it must predict."""

    tokens: torch.Tensor  # (B, L) int64: code ids, MASK where hidden
    classes: torch.Tensor  # (B,) int64: class id, or num_classes for none
    targets: torch.Tensor  # (B, L) int64: the true codes
    masked: torch.Tensor  # (B, L) bool: positions the loss is computed on


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``nn.MultiheadAttention(dim, heads, batch_first=True)``'s
    parameters, names, initialisation and output, so that either's checkpoints load into the other.
    On the CPU, softmax(q k^T / sqrt(d)) v is computed as written: on stage 2's sequences (8 and 64
    positions, 16 channels a head) PyTorch's fused CPU kernel takes twice as long, forward and
    backward (docs/benchmarks.md). Elsewhere the fused kernel."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.explicit: bool | None = None  # None: explicit on the CPU only
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # nn.MultiheadAttention's initialisation, in its order (the same seed, the same weights).
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(batch, length, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, length, head dim)
        explicit = x.device.type == "cpu" if self.explicit is None else self.explicit
        if explicit:
            attended = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, dim))


class FactorizedBlock(nn.Module):
    """Pre-norm residual block: (optionally) a depthwise convolution over the token grid,
    attention within each latent frame, attention across the frames at each position, then a
    GELU MLP."""

    def __init__(self, dim: int, heads: int, latent_shape: tuple[int, int, int], conv_position: bool = False):
        super().__init__()
        self.latent_shape = latent_shape
        self.frames, self.positions = latent_shape[0], latent_shape[1] * latent_shape[2]
        self.conv = nn.Conv3d(dim, dim, 3, padding=1, groups=dim) if conv_position else None
        self.space_norm, self.time_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.space = SelfAttention(dim, heads)
        self.time = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        t, hw = self.frames, self.positions
        if self.conv is not None:
            grid = x.transpose(1, 2).reshape(batch, dim, *self.latent_shape)
            x = x + self.conv(grid).flatten(2).transpose(1, 2)
        h = self.space_norm(x).reshape(batch * t, hw, dim)  # one sequence per latent frame
        x = x + self.space(h).reshape(batch, length, dim)
        h = self.time_norm(x).reshape(batch, t, hw, dim).transpose(1, 2).reshape(batch * hw, t, dim)
        attended = self.time(h)  # one sequence per position
        x = x + attended.reshape(batch, hw, t, dim).transpose(1, 2).reshape(batch, length, dim)
        return x + self.mlp(self.mlp_norm(x))


def masked_token_loss(
    logits: torch.Tensor, batch: MaskedBatch, common_code: int | None = None, object_weight: float = 1.0
) -> torch.Tensor:
    """Cross-entropy of the masked tokens (MaskGIT's objective): ``logits`` (N, codebook) are the
    model's at ``batch.masked`` (``model(tokens, classes, at=batch.masked)``). With
    ``object_weight`` != 1, a masked token whose true code is not ``common_code`` (the
    background's) weighs that much."""
    truth = batch.targets[batch.masked]
    if object_weight == 1.0 or common_code is None:
        return F.cross_entropy(logits.float(), truth)
    weights = torch.where(truth == common_code, 1.0, object_weight)
    return (F.cross_entropy(logits.float(), truth, reduction="none") * weights).sum() / weights.sum()


def masked_accuracy(logits: torch.Tensor, batch: MaskedBatch) -> torch.Tensor:
    """The share of the masked tokens whose most likely code is the true one (``logits`` as for
    ``masked_token_loss``)."""
    return (logits.argmax(-1) == batch.targets[batch.masked]).float().mean()


class MaskedVideoTransformer(nn.Module):
    def __init__(self, cfg: Stage2Config, codebook_size: int, latent_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.codebook_size = codebook_size
        self.mask_id = codebook_size  # one id past the codebook
        self.latent_shape = tuple(latent_shape)
        self.num_classes = num_classes
        self.length = math.prod(latent_shape)
        # The blocks see a grid of patch x patch tokens each (ViT's and DiT's patches over the code
        # grid): a fourth of the positions at patch 2, so that width and depth cost less.
        t, h, w = self.latent_shape
        self.grid = (t, h // cfg.patch, w // cfg.patch)
        self.token_embedding = nn.Embedding(codebook_size + 1, cfg.dim)
        self.class_embedding = nn.Embedding(num_classes + 1, cfg.dim)  # the last one: no class
        self.merge = self.split = None
        if cfg.patch > 1:
            self.merge = nn.Linear(cfg.patch**2 * cfg.dim, cfg.dim)
            self.split = nn.Linear(cfg.dim, cfg.patch**2 * cfg.dim)
        self.position = nn.Parameter(torch.zeros(1, math.prod(self.grid), cfg.dim))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(
            *(FactorizedBlock(cfg.dim, cfg.heads, self.grid, cfg.conv_position) for _ in range(cfg.depth))
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, codebook_size)

    def forward(self, tokens: torch.Tensor, classes: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, codebook_size) for every token position; with ``at`` (B, L) bool, (N,
        codebook_size) for its N true positions in row-major order, as ``logits[at]`` would give
        them: the loss needs only the masked tokens', and the head is a fifth of the forward."""
        x = self.token_embedding(tokens)
        if self.merge is not None:
            x = self.merge(self._patches(x))
        x = self.norm(self.blocks(x + self.position + self.class_embedding(classes)[:, None]))
        if self.split is not None:
            x = self._tokens(self.split(x))
        return self.head(x if at is None else x[at])

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) per token, time-major -> (B, patches, patch * patch * D), time-major."""
        (t, h, w), p = self.grid, self.cfg.patch
        x = x.reshape(len(x), t, h, p, w, p, x.shape[-1]).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(len(x), t * h * w, -1)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``_patches``."""
        (t, h, w), p = self.grid, self.cfg.patch
        x = x.reshape(len(x), t, h, w, p, p, -1).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(len(x), self.length, -1)

    # --- training ------------------------------------------------------------------------------

    def given_positions(self, frames: int) -> torch.Tensor:
        """(L,) bool: the tokens of the first ``frames`` latent frames."""
        t, h, w = self.latent_shape
        given = torch.zeros(t, h * w, dtype=torch.bool)
        given[:frames] = True
        return given.flatten()

    def mask_for_training(
        self, codes: torch.Tensor, labels: torch.Tensor, given_codes: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MaskedBatch:
        """A task per sample (drawn with the configured weights), then MaskGIT's cosine masking of
        the tokens that task does not give. ``given_codes`` (like ``codes``): what the prediction
        task is given in its first latent frames, as ``predict`` encodes them; by default the
        codes themselves. Draws from ``generator``, by default torch's global one, which every
        checkpoint saves, so a resumed run draws the same masks."""
        batch = len(codes)
        targets = codes.flatten(1)
        weights = torch.tensor([self.cfg.unconditional_weight, self.cfg.class_weight, self.cfg.predict_weight])
        tasks = torch.multinomial(weights, batch, replacement=True, generator=generator)
        none = torch.full_like(labels, self.num_classes)
        classes = torch.where(tasks == CLASS_CONDITIONAL, labels, none)
        given = self.given_positions(self.predict_frames())[None].expand(batch, -1) & (tasks == PREDICTION)[:, None]
        candidates = ~given
        ratio = cosine_schedule(torch.rand(batch, generator=generator))  # the share of them to mask
        counts = (ratio * candidates.sum(1)).ceil().clamp(min=1)
        scores = torch.rand(batch, self.length, generator=generator).masked_fill(~candidates, 2.0)  # given: never masked
        if self.cfg.frame_masking > 0:
            counts, scores = self._mask_from_a_frame(tasks, ratio, counts, scores, generator)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        masked = ranks < counts[:, None]
        tokens = targets if given_codes is None else torch.where(given, given_codes.flatten(1), targets)
        return MaskedBatch(tokens.masked_fill(masked, self.mask_id), classes, targets, masked)

    def _mask_from_a_frame(
        self, tasks: torch.Tensor, ratio: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For a ``frame_masking`` share of the prediction samples, the mask counts and scores of
        frame-by-frame decoding: frame ``k`` (drawn after the given frames) masked to ``ratio``,
        the frames before it never (score 2), the frames after it always (score -1)."""
        batch = len(tasks)
        t, h, w = self.latent_shape
        chosen = (torch.rand(batch, generator=generator) < self.cfg.frame_masking) & (tasks == PREDICTION)
        first = self.predict_frames()
        frame = first + (torch.rand(batch, generator=generator) * (t - first)).long()
        frame_of = torch.arange(self.length) // (h * w)
        before, after = frame_of[None] < frame[:, None], frame_of[None] > frame[:, None]
        framed = scores.masked_fill(before, 2.0).masked_fill(after, -1.0)
        framed_counts = after.sum(1) + (ratio * h * w).ceil().clamp(min=1)
        return torch.where(chosen, framed_counts, counts), torch.where(chosen[:, None], framed, scores)

    def predict_frames(self) -> int:
        """Latent frames given in the prediction task: the configured number, or half."""
        return self.cfg.predict_latent_frames or self.latent_shape[0] // 2

    # --- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, classes: torch.Tensor, given: torch.Tensor | None = None, given_frames: int = 0,
        steps: int | None = None, temperature: float | None = None, generator: torch.Generator | None = None,
        frame_steps: int = 0, uncertain_per_step: int = 0,
    ) -> torch.Tensor:
        """Codes (B, t, h, w) by MaskGIT's iterative decoding. ``classes`` (B,): a class id, or
        ``num_classes`` for none; ``given`` (B, t, h, w): codes whose first ``given_frames``
        latent frames are kept as they are (frame prediction). ``frame_steps`` > 0 decodes one
        latent frame after another in that many steps each, instead of all at once in ``steps``;
        ``uncertain_per_step``: ``job.models.maskgit.decode``'s."""
        batch, device = len(classes), classes.device
        tokens = torch.full((batch, self.length), self.mask_id, dtype=torch.long, device=device)
        if given is not None and given_frames:
            keep = self.given_positions(given_frames).to(device)
            tokens[:, keep] = given.flatten(1)[:, keep]
        none = torch.full_like(classes, self.num_classes)
        guidance = self.cfg.guidance if bool((classes != self.num_classes).any()) else 0.0

        def logits_fn(current: torch.Tensor) -> torch.Tensor:
            logits = self(current, classes).float()
            if guidance > 0:  # classifier-free guidance: away from the "none" prediction, toward the class
                logits = logits + guidance * (logits - self(current, none).float())
            return logits

        options = dict(
            mask_id=self.mask_id, schedule=cosine_schedule, generator=generator,
            temperature=self.cfg.temperature if temperature is None else temperature,
            choice_temperature=self.cfg.choice_temperature, uncertain_per_step=uncertain_per_step,
        )
        if frame_steps:
            decoded = decode_frame_by_frame(
                tokens, logits_fn, frames=self.latent_shape[0], steps_per_frame=frame_steps, **options)
        else:
            decoded = decode(tokens, logits_fn, steps=steps or self.cfg.sample_steps, **options)
        return decoded.view(batch, *self.latent_shape)


def initial_transformer(cfg: Config, tokenizer: VideoTokenizer) -> MaskedVideoTransformer:
    """The initial weights: a pure function of the seed."""
    torch.manual_seed(cfg.seed)
    return MaskedVideoTransformer(cfg.stage2, tokenizer.codebook_size, tokenizer.latent_shape(), len(cfg.data.classes))


def trained_transformer(weights: dict[str, torch.Tensor], cfg: Config, tokenizer: VideoTokenizer,
                        device: torch.device | str = "cpu") -> MaskedVideoTransformer:
    model = MaskedVideoTransformer(cfg.stage2, tokenizer.codebook_size, tokenizer.latent_shape(), len(cfg.data.classes))
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval()
