"""The presets (README.md, "Command line"): `smoke` for tests and fault drills (seconds), `small` for the CPU demo
(minutes on 2 cores), `default` for the GPU run. Each is a set of dotted overrides of the
dataclass defaults in job.config."""

from __future__ import annotations

from typing import Any

# What docs/quality.md measured: the straight-through clamp output that starts black
# removes the grey haze on every preset; one latent frame per video frame (temporal_downsample 0)
# removes the ghosts of neighbouring frames on the CPU presets. The GPU preset keeps its 4x
# temporal compression: no GPU was at hand to measure it.
QUALITY_OUTPUT = {"model.output": "clamp", "model.output_bias_init": -0.5}

# docs/generation.md, "Tokens that mean something": a black clip is one code (eval-mode BatchNorm
# and replicate padding carry no statistic of the clip to a black cell), no diversity bonus to
# scatter codes, and specks charged for what they are.
TOKENS = {
    "model.norm": "batch",
    "model.padding": "replicate",
    "model.decoder_padding": "replicate",
    "model.diversity_gamma": 0.0,
    "model.speck_weight": 0.1,
}

# docs/generation.md, "What stage 2 learns": a convolution over the token grid in every block
# tells each token where the object is beside it from the first step; learned positions alone
# took hundreds of steps to matter, more than the CPU presets train.
# "Decoding in the order of time": predict draws each latent frame after the one before it, 2 steps
# each, where all at once left most predicted frames without a visible object.
STAGE2 = {"stage2.conv_position": True, "stage2.predict_frame_steps": 2}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {**QUALITY_OUTPUT, **STAGE2},
    "small": {
        "data.num_samples": 1_200,
        "data.frames": 8,
        "data.height": 32,
        "data.width": 32,
        "data.shard_size": 400,
        "data.blob_sigma": 1.0,
        "model.channels": 16,  # oneDNN pads channels to multiples of 16: 24 costs as much as 32
        "model.channel_mults": (1, 2),
        "model.temporal_downsample": 0,
        "model.codebook_bits": 8,
        **QUALITY_OUTPUT,
        # docs/generation.md, "Tokens that mean something": every tokenizer goal met, 11 object
        # codes in use where the diversity bonus made 238.
        **TOKENS,
        # docs/generation.md, "A wider look for each token": black cells pulled to the background's
        # code, so that no halo of codes around the object is left for stage 2 to draw.
        "model.background_code_weight": 0.1,
        "optim.lr": 2e-3,
        "optim.warmup_steps": 50,
        # 6 epochs: every tokenizer goal is still met with room (docs/generation.md, "Where the
        # demo's minutes go"), and the 4 epochs it leaves buy stage 2 another 7.
        "train.epochs": 6,
        "train.batch_size": 16,
        "checkpoint.every_epochs": 2,
        "checkpoint.every_minutes": 2.0,
        "monitor.heartbeat_seconds": 10.0,
        # 2,048 tokens per video (8 x 16 x 16), 512 positions for stage 2's blocks.
        **STAGE2,
        # docs/generation.md, "Training prediction as predict decodes it": the prediction task masked
        # from a frame on, as predict meets it frame by frame (linear paths 3.1-3.4 px off, not 4.2).
        "stage2.frame_masking": 1.0,
        # docs/generation.md, "Training seeds, and four more changes": 4 steps a predicted frame, each
        # keeping at most 2 uncertain tokens, draw one object in more predicted frames than 8 steps.
        "stage2.predict_frame_steps": 4,
        "stage2.predict_uncertain_per_step": 2,
        # docs/generation.md, "Patches of codes": the blocks see 2 x 2 codes as one position, so a
        # stage 2 twice as wide and one layer deeper trains 16 epochs in the minutes 14 took.
        "stage2.patch": 2,
        "stage2.epochs": 16,
        "stage2.batch_size": 16,
        "stage2.dim": 64,
        "stage2.depth": 3,
        "stage2.heads": 4,
        # docs/generation.md, "Stage 2's learning rate and the object's weight": 3x the rate, in the same minutes, predicts
        # below constant velocity and draws generated videos 3x nearer the real ones; weighting the
        # object's tokens 3x then draws the object in nearly every generated and predicted frame.
        "stage2.lr": 6e-3,
        "stage2.object_weight": 3.0,
        # docs/generation.md, "The class in more samples": no unconditional task (no mode samples
        # without a class, and `small` samples without guidance), its share given to the class:
        # generated videos of their class by track 59-70% instead of 44-53% over three sampling seeds.
        "stage2.unconditional_weight": 0.0,
        "stage2.class_weight": 3.0,
        "stage2.warmup_steps": 20,
        "stage2.samples_per_class": 16,  # evaluate scores generation on 64 videos (±6 points a class, not ±12)
        # docs/generation.md, "Fewer tokens a decoding step": 24 steps draw one object in 97% of
        # the generated frames that show one over three seeds, 12 in 94-95%.
        "stage2.sample_steps": 24,
    },
    "smoke": {
        "data.num_samples": 256,
        "data.frames": 4,
        "data.height": 16,
        "data.width": 16,
        "data.shard_size": 64,
        "data.blob_sigma": 0.8,
        "model.channels": 8,
        "model.channel_mults": (1, 2),
        "model.temporal_downsample": 0,
        "model.codebook_bits": 6,
        **QUALITY_OUTPUT,
        # Tokens that mean something (docs/generation.md): black is one code, no diversity bonus,
        # specks charged, each frame encoded alone (no trail of codes in other frames, and a
        # third of the encoder's time), black cells pulled to the background's code.
        **TOKENS,
        "model.encoder_time": "frame",
        "model.background_code_weight": 0.1,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 4,
        "train.epochs": 4,
        "train.batch_size": 8,
        "train.log_every_batches": 2,
        # One thread: a tiny model gains nothing from two, and fault drills run beside an S3
        # server and other jobs, where two spinning OpenMP threads per process slow it 10x.
        "train.threads": 1,
        "checkpoint.every_epochs": 1,
        "checkpoint.every_steps": 5,
        "checkpoint.every_minutes": 0.0,
        "checkpoint.keep_last": 2,
        "monitor.heartbeat_seconds": 2.0,
        "monitor.progress_every_seconds": 0.5,
        # A kill -9 on another machine costs a restart this much; on the same machine none.
        "storage.lease_seconds": 6.0,
        **STAGE2,
        "stage2.epochs": 3,
        "stage2.batch_size": 8,
        "stage2.dim": 32,
        "stage2.depth": 2,
        "stage2.heads": 2,
        "stage2.lr": 3e-3,
        "stage2.warmup_steps": 4,
        "stage2.sample_steps": 6,
        "stage2.samples_per_class": 2,
        "stage2.eval_videos": 16,
    },
}
