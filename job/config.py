"""The one way to configure a run: dataclasses, presets, a file, then ``--set`` overrides.

Precedence, lowest first: dataclass defaults (the ``default`` GPU preset), the chosen preset,
``--config FILE`` (JSON or TOML), repeated ``--set key=value``. Every override names a dotted
key; an unknown key, a value of the wrong type or an impossible value raises ``ConfigError``
before any work starts, and the command line turns that into exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.exits import EXIT_USAGE
from job.presets import PRESETS


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
    # Sampling (sample, predict, evaluate): not part of the training math.
    sample_steps: int = 12
    temperature: float = 1.0
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
        return _jsonable(dataclasses.asdict(self))


# Sections whose values change the numbers a run computes. Resuming with any of them changed
# is refused; everything else (epochs, cadence, logging) may differ between attempts.
MATH_SECTIONS = ("seed", "data", "model", "optim", "train.batch_size", "train.bf16")
# Stage 2 trains on the tokenizer's codes: its checkpoints also depend on its own section.
STAGE2_MATH_SECTIONS = (*MATH_SECTIONS, "stage2")
# data.uri only says where the same shards live, so moving them is not a change of math; the
# stage-2 epochs and sampling settings do not change what has been trained.
NOT_MATH_KEYS = (
    "data.uri", "stage2.epochs", "stage2.sample_steps", "stage2.temperature", "stage2.samples_per_class",
    "stage2.sample_seed", "stage2.eval_videos", "stage2.guidance",
)


def build_config(
    preset: str = "default",
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
) -> Config:
    """Resolve the config of a run: defaults, preset, file, then ``key=value`` overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = Config()
    for key, value in PRESETS[preset].items():
        set_value(config, key, value)
    if config_file is not None:
        for key, value in _flatten(_read_config_file(Path(config_file))).items():
            set_value(config, key, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        set_value(config, key.strip(), text)
    validate(config)
    return config


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config from its ``to_dict`` form (e.g. a run's config.json)."""
    config = Config()
    for key, value in _flatten(values).items():
        set_value(config, key, value)
    validate(config)
    return config


def get_value(config: Config | dict[str, Any], key: str) -> Any:
    """The value of a dotted key, from a Config or from its dict form (a checkpoint's config)."""
    value: Any = config
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def set_value(config: Config, key: str, value: Any) -> None:
    """Set a dotted key, converting ``value`` (a string from the command line, or a parsed
    value from a file) to the field's declared type."""
    *sections, name = key.split(".")
    target: Any = config
    for i, section in enumerate(sections):
        child = getattr(target, section, None) if _has_field(target, section) else None
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{key}: unknown key ({'.'.join(sections[: i + 1])} is not a section)")
        target = child
    if not _has_field(target, name) or dataclasses.is_dataclass(getattr(target, name)):
        raise ConfigError(f"{key}: unknown key; known keys: {', '.join(_keys_of(target, sections))}")
    field_type = typing.get_type_hints(type(target))[name]
    setattr(target, name, _convert(key, value, field_type))


def diff_keys(old: dict[str, Any], new: dict[str, Any], sections: typing.Sequence[str]) -> list[str]:
    """Dotted keys under ``sections`` whose values differ between two ``to_dict`` configs."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    changed = []
    for key in sorted(set(flat_old) | set(flat_new)):
        in_scope = any(key == s or key.startswith(s + ".") for s in sections)
        if in_scope and key not in NOT_MATH_KEYS and flat_old.get(key) != flat_new.get(key):
            changed.append(key)
    return changed


# The most float32 elements one tensor of a run (a weight, or one batch's activation) may hold:
# 64 GiB, about half of the largest single accelerator's memory (141 GB on an H200), which must
# also hold the gradients and the optimizer's moments. A size beyond it cannot work anywhere.
MAX_TENSOR_ELEMENTS = 2**34


def validate(config: Config) -> None:
    """Refuse values no run could use, naming the key."""
    refuse_non_finite(config)
    refuse_impossible_sizes(config)
    d, m, o, t, c, mon = config.data, config.model, config.optim, config.train, config.checkpoint, config.monitor
    positive = {
        "data.num_samples": d.num_samples, "data.frames": d.frames, "data.height": d.height,
        "data.width": d.width, "data.shard_size": d.shard_size, "data.blob_sigma": d.blob_sigma,
        "model.channels": m.channels, "model.res_blocks": m.res_blocks,
        "model.codebook_bits": m.codebook_bits, "optim.lr": o.lr, "optim.grad_clip": o.grad_clip,
        "train.epochs": t.epochs, "train.batch_size": t.batch_size,
        "train.log_every_batches": t.log_every_batches, "checkpoint.keep_last": c.keep_last,
        "monitor.heartbeat_seconds": mon.heartbeat_seconds,
        "monitor.watchdog_minutes": mon.watchdog_minutes,
        "monitor.progress_every_seconds": mon.progress_every_seconds,
        "monitor.plot_every_seconds": mon.plot_every_seconds,
        "storage.retry_max_seconds": config.storage.retry_max_seconds,
        "storage.lease_seconds": config.storage.lease_seconds,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")
    non_negative = {
        "seed": config.seed, "data.seed": d.seed, "optim.warmup_steps": o.warmup_steps,
        "optim.weight_decay": o.weight_decay, "model.temporal_downsample": m.temporal_downsample,
        "model.entropy_loss_weight": m.entropy_loss_weight,
        "model.commitment_loss_weight": m.commitment_loss_weight, "train.val_batches": t.val_batches,
        "train.threads": t.threads, "checkpoint.every_epochs": c.every_epochs,
        "checkpoint.every_steps": c.every_steps, "checkpoint.every_minutes": c.every_minutes,
        "storage.connect_seconds": config.storage.connect_seconds,
        "storage.flush_seconds": config.storage.flush_seconds,
        "storage.signal_flush_seconds": config.storage.signal_flush_seconds,
        "storage.live_upload_seconds": config.storage.live_upload_seconds,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value!r}")
    if len(d.classes) < 4 or len(set(d.classes)) != len(d.classes):
        raise ConfigError(f"data.classes: need at least 4 distinct classes, got {list(d.classes)}")
    unknown = [name for name in d.classes if name not in TRAJECTORY_CLASSES]
    if unknown:
        raise ConfigError(f"data.classes: unknown class {unknown[0]!r}; known: {', '.join(TRAJECTORY_CLASSES)}")
    if not (0 <= d.noise_std_min <= d.noise_std_max):
        raise ConfigError("data.noise_std_min: must satisfy 0 <= noise_std_min <= noise_std_max")
    for key, value in {"data.val_fraction": d.val_fraction, "data.test_fraction": d.test_fraction}.items():
        if not 0 < value < 0.5:
            raise ConfigError(f"{key}: must be in (0, 0.5), got {value!r}")
    n_val, n_test = split_sizes(d)[1:]
    if d.num_samples - n_val - n_test < t.batch_size:
        raise ConfigError(
            f"data.num_samples: {d.num_samples} leaves fewer training samples than "
            f"train.batch_size={t.batch_size}"
        )
    if not m.channel_mults or any(x <= 0 for x in m.channel_mults):
        raise ConfigError(f"model.channel_mults: need positive multipliers, got {list(m.channel_mults)}")
    downs = len(m.channel_mults) - 1
    if m.temporal_downsample > downs:
        raise ConfigError(f"model.temporal_downsample: at most {downs} (stages - 1), got {m.temporal_downsample}")
    for key, size, factor in (
        ("data.height", d.height, 2**downs),
        ("data.width", d.width, 2**downs),
        ("data.frames", d.frames, 2**m.temporal_downsample),
    ):
        if size % factor:
            raise ConfigError(f"{key}: {size} is not divisible by the model's downsampling factor {factor}")
    if not 1 <= m.codebook_bits <= 18:
        raise ConfigError(f"model.codebook_bits: must be in 1..18, got {m.codebook_bits}")
    for key, value, allowed in (
        ("model.recon_loss", m.recon_loss, ("mse", "l1")),
        ("model.output", m.output, ("clamp", "sigmoid")),
        ("model.upsample", m.upsample, ("subpixel", "repeat")),
        ("model.norm", m.norm, ("group", "channel", "batch", "none")),
        ("model.padding", m.padding, ("zeros", "replicate")),
        ("model.decoder_norm", m.decoder_norm, ("group", "channel", "batch", "none")),
        ("model.decoder_padding", m.decoder_padding, ("zeros", "replicate")),
        ("model.entropy_on", m.entropy_on, ("all", "object")),
    ):
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    if not 0 < m.foreground_balance < 1:
        raise ConfigError(f"model.foreground_balance: must be in (0, 1), got {m.foreground_balance}")
    if not 0 < m.foreground_threshold < 1:
        raise ConfigError(f"model.foreground_threshold: must be in (0, 1), got {m.foreground_threshold}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    for key, value in {"optim.beta1": o.beta1, "optim.beta2": o.beta2}.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {value}")
    s2 = config.stage2
    for key, value in {
        "stage2.batch_size": s2.batch_size, "stage2.dim": s2.dim, "stage2.depth": s2.depth, "stage2.heads": s2.heads,
        "stage2.lr": s2.lr, "stage2.sample_steps": s2.sample_steps, "stage2.samples_per_class": s2.samples_per_class,
        "stage2.eval_videos": s2.eval_videos,
    }.items():
        if not value > 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")
    for key, value in {
        "stage2.epochs": s2.epochs, "stage2.warmup_steps": s2.warmup_steps, "stage2.temperature": s2.temperature,
        "stage2.predict_latent_frames": s2.predict_latent_frames, "stage2.sample_seed": s2.sample_seed,
        "stage2.unconditional_weight": s2.unconditional_weight, "stage2.class_weight": s2.class_weight,
        "stage2.predict_weight": s2.predict_weight, "stage2.guidance": s2.guidance,
        "stage2.object_weight": s2.object_weight,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value!r}")
    if s2.dim % s2.heads:
        raise ConfigError(f"stage2.dim: {s2.dim} is not divisible by stage2.heads={s2.heads}")
    if not s2.unconditional_weight + s2.class_weight + s2.predict_weight > 0:
        raise ConfigError("stage2.predict_weight: the three task weights must not all be 0")
    latent_frames = d.frames // 2**m.temporal_downsample
    if s2.predict_latent_frames >= latent_frames:
        raise ConfigError(
            f"stage2.predict_latent_frames: must leave a latent frame to predict (the tokenizer gives {latent_frames})"
        )
    if d.num_samples - n_val - n_test < s2.batch_size:
        raise ConfigError(f"stage2.batch_size: {s2.batch_size} is more than the {d.num_samples - n_val - n_test} training samples")
    if t.device not in ("auto", "cpu", "cuda") and not t.device.startswith("cuda:"):
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {t.device!r}")


def refuse_non_finite(config: Config) -> None:
    """Every float setting, found by walking the config, must be a number: NaN passes every
    ``>=`` check unnoticed (a retry loop that never ends), infinity trains a NaN model."""
    for key, value in _flatten(config.to_dict()).items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")


def refuse_impossible_sizes(config: Config) -> None:
    """Sizes whose tensors no machine can hold, named by the key that makes them so (before a
    preflight would blame the disk, or an allocation fail minutes later)."""
    d, m, t, s2 = config.data, config.model, config.train, config.stage2
    widest = m.channels * max(m.channel_mults, default=1)
    pixels = d.frames * d.height * d.width
    downs = max(len(m.channel_mults) - 1, 0)
    tokens = max(d.frames >> m.temporal_downsample, 1) * max(d.height >> downs, 1) * max(d.width >> downs, 1)
    for key, elements, what in (
        ("model.channels", 27 * m.channels**2, "a 3x3x3 convolution's weight"),
        ("model.channel_mults", 27 * widest**2, f"the widest stage's ({widest} channels) convolution weight"),
        ("train.batch_size", t.batch_size * m.channels * pixels, "one batch's first-stage activation"),
        ("stage2.dim", 4 * s2.dim**2, "a transformer layer's feed-forward weight"),
        ("stage2.batch_size", s2.batch_size * s2.dim * tokens, "one batch's token embeddings"),
    ):
        if elements > MAX_TENSOR_ELEMENTS:
            raise ConfigError(
                f"{key}: too large: {what} would hold {elements:.3g} elements, more than the "
                f"{MAX_TENSOR_ELEMENTS:.3g} (64 GiB of float32) one tensor may take"
            )


def steps_per_epoch(cfg: Config, batch_size: int | None = None) -> int:
    """Optimizer steps per epoch at ``batch_size`` (the tokenizer's by default): the last batch of
    an epoch may be smaller, never dropped."""
    return math.ceil(split_sizes(cfg.data)[0] / (batch_size or cfg.train.batch_size))


def split_sizes(data: DataConfig) -> tuple[int, int, int]:
    """(train, val, test) sample counts; the splits are contiguous index ranges in that order."""
    n_val = max(1, round(data.num_samples * data.val_fraction))
    n_test = max(1, round(data.num_samples * data.test_fraction))
    return data.num_samples - n_val - n_test, n_val, n_test


# --- helpers -------------------------------------------------------------------------------


def _has_field(obj: Any, name: str) -> bool:
    return dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}


def _keys_of(obj: Any, prefix: list[str]) -> list[str]:
    return [".".join([*prefix, f.name]) for f in dataclasses.fields(obj)]


def _convert(key: str, value: Any, field_type: Any) -> Any:
    origin = typing.get_origin(field_type)
    try:
        if origin is tuple:
            item_type = typing.get_args(field_type)[0]
            if isinstance(value, str):
                text = value.strip()
                items = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            else:
                items = list(value)
            return tuple(_convert(key, item, item_type) for item in items)
        if field_type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if field_type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value.strip().replace("_", "")) if isinstance(value, str) else int(value)
        if field_type is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if field_type is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (ValueError, TypeError, json.JSONDecodeError):
        pass
    name = getattr(field_type, "__name__", str(field_type))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read ({exc.strerror})") from exc
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections")
    return values


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
