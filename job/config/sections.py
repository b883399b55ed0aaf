"""The run's settings as dataclasses, one section per concern, and what follows from them alone
(split sizes, steps per epoch, which keys change a run's numbers)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from job.exits import EXIT_USAGE


class ConfigError(ValueError):
    """A configuration a run cannot start with, or a run that refuses it; the message names the
    offending key."""

    exit_code, summary = EXIT_USAGE, "refused"


# The path families the synthetic data can draw (job.data.synthetic renders them, in this order).
TRAJECTORY_CLASSES: tuple[str, ...] = ("linear", "circular", "helical", "parabolic", "sinusoidal")


@dataclass
class DataConfig:
    seed: int = 0
    num_samples: int = 10_000
    frames: int = 16
    height: int = 64
    width: int = 64
    classes: tuple[str, ...] = ("linear", "circular", "helical", "parabolic")
    shard_size: int = 1_000
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    noise_std_min: float = 0.002
    noise_std_max: float = 0.006
    blob_sigma: float = 1.2  # std of the rendered object, in pixels of the frame
    uri: str = ""  # where the shards live; empty means <run>/data


@dataclass
class ModelConfig:
    channels: int = 64  # width of the first encoder stage
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one entry per stage; each stage after the first halves H and W
    temporal_downsample: int = 2  # how many of the spatial downsamplings also halve T
    res_blocks: int = 1  # residual blocks per stage
    codebook_bits: int = 10  # LFQ: codebook size 2**bits, one bit per latent channel
    entropy_loss_weight: float = 0.1
    commitment_loss_weight: float = 0.25
    diversity_gamma: float = 1.0
    foreground_threshold: float = 0.05  # a pixel brighter than this belongs to the object
    foreground_balance: float = 0.5  # share of the reconstruction loss given to object pixels
    # A background pixel drawn brighter than foreground_threshold costs its squared excess summed
    # over the frame (times this weight), not averaged with ~1,000 black pixels: a speck of a few
    # pixels is a second object to every judge, but the balanced mean hardly sees it.
    speck_weight: float = 0.0
    # A latent cell without object pixels (none above foreground_threshold) pays a hinge for each
    # LFQ bit on the wrong side of the background's code (the batch's most common code of such
    # cells), times this weight: nothing else stops the encoder from giving the black cells around
    # the object codes of their own, which the decoder ignores and stage 2 must still predict.
    background_code_weight: float = 0.0
    # The next three default to what runs made before they existed used, so that such a run's
    # config.json still rebuilds its model; every preset sets what docs/quality.md measured best.
    recon_loss: str = "mse"  # mse or l1: the per-pixel error that reconstruction_loss balances
    output: str = "sigmoid"  # clamp (straight-through, black is exactly 0) or sigmoid
    upsample: str = "repeat"  # subpixel (depth-to-space, features of its own per frame) or repeat
    # Added to the decoder's last bias at the start. Below 0 with the clamp output, a fresh
    # decoder draws black (the right answer for >95% of pixels) and only learns where to raise it.
    output_bias_init: float = 0.0
    # GroupNorm and zero padding (the defaults, what older runs used) make a black region's code
    # depend on the clip around it; ``channel`` (per-voxel) norm and ``replicate`` padding make a
    # constant clip encode to one code everywhere.
    norm: str = "group"  # the encoder's: group, channel, batch or none
    padding: str = "zeros"  # the encoder's: zeros or replicate
    # What of the clip a frame's codes see (the encoder's time kernels): ``centered`` (3 frames:
    # the frames after it too, so a prediction's given codes see the future it is scored on),
    # ``causal`` (3 frames ending at it, MAGVIT-v2's: a code knows how the object came, never
    # where it goes) or ``frame`` (itself alone; needs temporal_downsample 0).
    encoder_time: str = "centered"
    # Which latent cells LFQ's diversity bonus (codebook entropy, diversity_gamma) is computed over:
    # all, or only those that hold an object pixel, so that it cannot reward scattering black.
    entropy_on: str = "all"  # all or object
    decoder_norm: str = "group"  # the decoder's (it does not choose the codes)
    decoder_padding: str = "zeros"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 200
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 32
    log_every_batches: int = 5
    val_batches: int = 0  # 0 means the whole validation split
    device: str = "auto"  # auto: cuda when available, else cpu
    bf16: bool = True  # autocast on CUDA only; CPU runs in float32 for exact resume
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's choice


@dataclass
class Stage2Config:
    """MAGVIT stage 2: the masked token transformer over the frozen tokenizer's codes. ``train``
    runs it after the tokenizer; epochs 0 skips it."""

    epochs: int = 60
    batch_size: int = 32
    dim: int = 256
    depth: int = 8
    heads: int = 8
    lr: float = 5e-4
    warmup_steps: int = 200
    # How often each task is drawn for a training sample (relative weights).
    unconditional_weight: float = 1.0
    class_weight: float = 2.0
    predict_weight: float = 2.0
    # Training loss weight of a masked token whose true code is not the background's (the train
    # split's most common code), against 1 for background tokens; validation stays unweighted.
    object_weight: float = 1.0
    predict_latent_frames: int = 0  # latent frames given when predicting; 0 means half of them
    # The share of the prediction task's samples masked as predict meets them when it decodes frame
    # by frame (stage2.predict_frame_steps): a random latent frame after the given ones partly
    # masked on MaskGIT's schedule, the frames before it visible, every frame after it masked.
    # The rest, and the other tasks, are masked on the schedule over all their tokens.
    frame_masking: float = 0.0
    # A depthwise 3x3x3 convolution over the token grid at the start of each block (a conditional
    # position encoding, as in CPVT): where the object is next to a token, from the first step,
    # where learned absolute positions take hundreds of steps to matter (docs/generation.md).
    # Off by default only so that runs trained before it still load; every preset turns it on.
    conv_position: bool = False
    # Patch side over the code grid: the blocks see one position per patch x patch codes of a
    # latent frame (1: one per code; docs/generation.md, "Patches of codes").
    patch: int = 1
    # Sampling (sample, predict, evaluate): not part of the training math.
    sample_steps: int = 12
    temperature: float = 1.0
    # How far decoding's order follows confidence (job.models.maskgit.decode; MaskGIT's "choice
    # temperature"): where nearly every token is background, a confidence order leaves the
    # object's uncertain tokens to the last steps, all drawn at once (docs/generation.md).
    choice_temperature: float = 4.5
    # How predict decodes the frames after the given ones: 0, all at once in sample_steps steps; N,
    # one latent frame after another in N steps each, so that each frame's object is drawn beside
    # the one before it (docs/generation.md: more predicted frames show exactly one object).
    predict_frame_steps: int = 0
    # N > 0: a step of predict keeps at most N tokens a video whose drawn code is uncertain (below
    # job.models.maskgit.CERTAIN), and decoding takes the extra steps that needs, so that a predicted
    # object's codes are drawn a few at a time (docs/generation.md: one object in more predicted frames).
    predict_uncertain_per_step: int = 0
    # The same for generation (sample, evaluate): 0, every latent frame at once in sample_steps
    # steps; N, one latent frame after another in N steps each.
    sample_frame_steps: int = 0
    # Classifier-free guidance of class-conditional sampling: logits + guidance * (logits - the
    # logits of class "none"); 0 turns it off (one forward pass a step instead of two).
    guidance: float = 0.0
    samples_per_class: int = 4
    sample_seed: int = 0
    eval_videos: int = 64  # test videos the prediction section of evaluate uses


@dataclass
class CheckpointConfig:
    every_epochs: int = 10
    every_steps: int = 0  # 0 disables
    every_minutes: float = 10.0  # 0 disables
    keep_last: int = 3


@dataclass
class MonitorConfig:
    heartbeat_seconds: float = 30.0
    watchdog_minutes: float = 15.0
    progress_every_seconds: float = 5.0  # how often progress.json is rewritten between batches
    plot_every_seconds: float = 30.0  # plots are redrawn at epoch ends and checkpoints, at most this often (and at the end)


@dataclass
class StorageConfig:
    connect_seconds: float = 300.0  # how long each request to the run URI rides out a store that is away, before exit 1
    flush_seconds: float = 120.0  # how long the end of a run waits for the upload backlog
    signal_flush_seconds: float = 5.0  # the same after SIGTERM, inside docker stop's 10 s
    retry_max_seconds: float = 30.0  # longest pause between two upload retries
    live_upload_seconds: float = 1.0  # progress, logs and plots go to the run URI at most this often
    # One writer per run: how long a writer's lease outlives its last renewal (renewed every
    # quarter of it). A start after a kill -9 on another machine waits this long; a start waits
    # at most twice this for a live writer before exit 75.
    lease_seconds: float = 60.0

    @property
    def end_flush_seconds(self) -> float:
        """How long the end of a mode waits for its uploads: the backlog's time, but never less
        than a store that is away is waited for anywhere else."""
        return max(self.flush_seconds, self.connect_seconds)


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


# Sections whose values change the numbers a run computes. Resuming with any of them changed
# is refused; everything else (epochs, cadence, logging) may differ between attempts.
MATH_SECTIONS = ("seed", "data", "model", "optim", "train.batch_size", "train.bf16")
# Stage 2 trains on the tokenizer's codes: its checkpoints also depend on its own section.
STAGE2_MATH_SECTIONS = (*MATH_SECTIONS, "stage2")
# Stage 2's sampling settings: how sample, predict and evaluate draw from a trained stage 2, always
# the command line's (job.inference.load), never part of what was trained.
SAMPLING_KEYS = (
    "sample_steps", "temperature", "choice_temperature", "predict_frame_steps", "predict_uncertain_per_step",
    "sample_frame_steps", "guidance",
    "samples_per_class", "sample_seed", "eval_videos",
)
# data.uri only says where the same shards live, so moving them is not a change of math; the
# stage-2 epochs and sampling settings do not change what has been trained.
NOT_MATH_KEYS = ("data.uri", "stage2.epochs", *(f"stage2.{key}" for key in SAMPLING_KEYS))


def steps_per_epoch(cfg: Config, batch_size: int | None = None) -> int:
    """Optimizer steps per epoch at ``batch_size`` (the tokenizer's by default): the last batch of
    an epoch may be smaller, never dropped."""
    return math.ceil(split_sizes(cfg.data)[0] / (batch_size or cfg.train.batch_size))


def split_sizes(data: DataConfig) -> tuple[int, int, int]:
    """(train, val, test) sample counts; the splits are contiguous index ranges in that order."""
    n_val = max(1, round(data.num_samples * data.val_fraction))
    n_test = max(1, round(data.num_samples * data.test_fraction))
    return data.num_samples - n_val - n_test, n_val, n_test


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat



def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
