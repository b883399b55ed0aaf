"""Refusing a configuration no run could use, before any work starts; the message names the key."""

from __future__ import annotations

import math

from job.config.sections import TRAJECTORY_CLASSES, Config, ConfigError, flatten, split_sizes


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
        "model.commitment_loss_weight": m.commitment_loss_weight, "model.speck_weight": m.speck_weight,
        "model.background_code_weight": m.background_code_weight, "train.val_batches": t.val_batches,
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
    if m.encoder_time == "frame" and m.temporal_downsample:
        raise ConfigError("model.encoder_time: frame (each frame alone) cannot halve time; set model.temporal_downsample=0")
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
        ("model.encoder_time", m.encoder_time, ("centered", "causal", "frame")),
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
        "stage2.lr": s2.lr, "stage2.patch": s2.patch, "stage2.sample_steps": s2.sample_steps,
        "stage2.samples_per_class": s2.samples_per_class, "stage2.eval_videos": s2.eval_videos,
    }.items():
        if not value > 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")
    for key, value in {
        "stage2.epochs": s2.epochs, "stage2.warmup_steps": s2.warmup_steps, "stage2.temperature": s2.temperature,
        "stage2.predict_latent_frames": s2.predict_latent_frames, "stage2.sample_seed": s2.sample_seed,
        "stage2.unconditional_weight": s2.unconditional_weight, "stage2.class_weight": s2.class_weight,
        "stage2.predict_weight": s2.predict_weight, "stage2.guidance": s2.guidance,
        "stage2.object_weight": s2.object_weight, "stage2.predict_frame_steps": s2.predict_frame_steps,
        "stage2.sample_frame_steps": s2.sample_frame_steps, "stage2.predict_uncertain_per_step": s2.predict_uncertain_per_step,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value!r}")
    latent_side = d.height // 2**downs, d.width // 2**downs
    if any(side % s2.patch for side in latent_side):
        raise ConfigError(
            f"stage2.patch: {s2.patch} does not divide the tokenizer's {latent_side[0]} x {latent_side[1]} codes a frame"
        )
    if s2.dim % s2.heads:
        raise ConfigError(f"stage2.dim: {s2.dim} is not divisible by stage2.heads={s2.heads}")
    if not 0 <= s2.frame_masking <= 1:
        raise ConfigError(f"stage2.frame_masking: must be in [0, 1], got {s2.frame_masking!r}")
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
    for key, value in flatten(config.to_dict()).items():
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
