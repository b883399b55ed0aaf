"""``sample`` and ``predict`` (SPEC §15): what the trained stage-2 model makes, as files a person
can look at, under the run folder (through the RunStore, so s3:// runs get them too).

- ``sample``: ``stage2.samples_per_class`` class-conditional videos per class, by MaskGIT's
  decoding with ``stage2.sample_steps`` rounds at ``stage2.temperature``, from a torch.Generator
  seeded with ``stage2.sample_seed`` (the same settings give the same videos). Per video
  ``samples/<class>-<k>.png`` (its frames side by side), ``.gif`` (animated, with a progress bar
  under the frame so that no two frames are identical and none is merged away) and ``.npy``
  (float32 (T, H, W) in [0, 1]); ``samples/index.json`` lists them with the settings.
- ``predict``: the first ``stage2.eval_videos`` test videos (fewer if the split is smaller); the
  model is given the tokenizer's codes of the first ``predict_frames()`` latent frames of the real
  video, with class "none", and decodes the rest. ``predictions/<index>.png``: predicted | true |
  |error| strips; ``predictions/index.json``: per video its future-frame scores, and the summary
  of the model and both baselines (job.evaluate_stage2).

The sampling settings are the command line's (``--set stage2.*``); the model and the data are
the run's own (``load_stage2`` rebuilds them from the checkpoint's config).
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import structlog
import torch

from job.config import Config
from job.data import VideoDataset, prepare_dataset
from job.device import pick_device
from job.generation import Stage2Model, load_stage2
from job.monitoring.lifecycle import stop_point
from job.monitoring.progress import utc_now
from job.storage import Layout, RunStore

log = structlog.get_logger("job.sampling")

SAMPLES_INDEX = f"{Layout.samples}/index.json"
PREDICTIONS_INDEX = f"{Layout.predictions}/index.json"
GENERATION_BATCH = 64  # videos decoded together; fixed, so that a seed gives the same videos on any run
PIXELS_SHOWN = 96  # frames are scaled up (nearest) to at least this many pixels high in PNGs and GIFs
GIF_FRAME_MS = 250
GAP_PIXELS = 2


# --- the model's outputs, shared with evaluate -------------------------------------------------


def sampling_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def decode(model: Stage2Model, codes: torch.Tensor) -> torch.Tensor:
    """Frames (N, T, H, W) float32 in [0, 1], on the CPU."""
    return model.tokenizer.decode(codes.to(model.device))[:, 0].float().clamp(0.0, 1.0).cpu()


@torch.no_grad()
def generate_class_videos(
    model: Stage2Model, per_class: int, steps: int, temperature: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` class-conditional videos of every class, class by class: (frames (N, T, H,
    W) in [0, 1], labels (N,)). Deterministic for a seed: one generator, fixed batches."""
    num_classes = model.transformer.num_classes
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    generator = sampling_generator(seed, model.device)
    frames = []
    for start in range(0, len(labels), GENERATION_BATCH):
        stop_point("generating videos")  # the index, which lists the files, is written last
        classes = labels[start : start + GENERATION_BATCH].to(model.device)
        codes = model.transformer.generate(classes, steps=steps, temperature=temperature, generator=generator)
        frames.append(decode(model, codes))
    return torch.cat(frames) if frames else torch.zeros(0, *model.tokenizer.input_shape), labels


def given_video_frames(model: Stage2Model) -> int:
    """Video frames covered by the latent frames the prediction task gives."""
    frames = model.tokenizer.input_shape[0]
    latent_frames = model.tokenizer.latent_shape()[0]
    return model.transformer.predict_frames() * frames // latent_frames


@torch.no_grad()
def predict_videos(
    model: Stage2Model, videos: torch.Tensor, steps: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """The model's continuation of ``videos`` (N, 1, T, H, W): the tokenizer's codes of their first
    ``predict_frames()`` latent frames given, class "none", the rest generated. Frames (N, T, H, W)
    in [0, 1]; the given frames are the tokenizer's reconstruction of the real ones."""
    transformer = model.transformer
    codes = model.tokenizer.encode(videos.to(model.device))
    none = torch.full((len(videos),), transformer.num_classes, dtype=torch.long, device=model.device)
    predicted = transformer.generate(
        none, given=codes, given_frames=transformer.predict_frames(), steps=steps, temperature=temperature,
        generator=generator,
    )
    return decode(model, predicted)


def prediction_indices(dataset: VideoDataset, eval_videos: int) -> np.ndarray:
    """The first ``eval_videos`` test videos, in order."""
    return dataset.split("test")[: max(eval_videos, 0)]


@torch.no_grad()
def predict_test_videos(
    model: Stage2Model, dataset: VideoDataset, indices: np.ndarray, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted frames, true frames, labels) of the test videos ``indices``, with the sampling
    settings of ``cfg.stage2`` and one generator seeded with its sample_seed."""
    s2 = cfg.stage2
    generator = sampling_generator(s2.sample_seed, model.device)
    predicted, truth, labels = [], [], []
    for start in range(0, len(indices), GENERATION_BATCH):
        stop_point("predicting frames")  # the index, which lists the files, is written last
        videos, batch_labels = dataset.get(indices[start : start + GENERATION_BATCH])
        predicted.append(predict_videos(model, videos, s2.sample_steps, s2.temperature, generator))
        truth.append(videos[:, 0])
        labels.append(batch_labels)
    if not predicted:
        empty = torch.zeros(0, *model.tokenizer.input_shape)
        return empty, empty, torch.zeros(0, dtype=torch.long)
    return torch.cat(predicted), torch.cat(truth), torch.cat(labels)


# --- image files -------------------------------------------------------------------------------


def _scale(frames: np.ndarray) -> int:
    return max(1, -(-PIXELS_SHOWN // frames.shape[-2]))


def _gray(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) in [0, 1] -> uint8, each frame scaled up by nearest neighbour."""
    scale = _scale(frames)
    pixels = np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)
    return pixels.repeat(scale, axis=-2).repeat(scale, axis=-1)


def strip_png(frames: np.ndarray) -> bytes:
    """The frames (T, H, W) side by side, gray, with a mid-gray gap between them."""
    from PIL import Image

    scaled = _gray(frames)
    t, h, w = scaled.shape
    strip = np.full((h, t * w + (t - 1) * GAP_PIXELS), 128, dtype=np.uint8)
    for i, frame in enumerate(scaled):
        strip[:, i * (w + GAP_PIXELS) : i * (w + GAP_PIXELS) + w] = frame
    out = io.BytesIO()
    Image.fromarray(strip, mode="L").save(out, format="PNG")
    return out.getvalue()


def animated_gif(frames: np.ndarray) -> bytes:
    """An animated GIF of the frames (T, H, W), looping, with a progress bar under each frame
    (which also keeps Pillow from merging identical consecutive frames: one GIF frame per frame)."""
    from PIL import Image

    scaled = _gray(frames)
    t, h, w = scaled.shape
    bar = max(2, h // 32)
    images = []
    for i, frame in enumerate(scaled):
        canvas = np.full((h + bar, w), 64, dtype=np.uint8)
        canvas[:h] = frame
        canvas[h:, : max(1, round(w * (i + 1) / t))] = 255
        images.append(Image.fromarray(canvas, mode="L"))
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)
    return out.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


# --- the modes ---------------------------------------------------------------------------------


def _settings(cfg: Config, model: Stage2Model) -> dict[str, Any]:
    s2 = cfg.stage2
    return {
        "checkpoint": model.checkpoint.name,
        "checkpoint_step": model.checkpoint.step,
        "stage2_complete": model.complete,
        "tokenizer_checkpoint": model.tokenizer_checkpoint.name,
        "seed": s2.sample_seed,
        "steps": s2.sample_steps,
        "temperature": s2.temperature,
        "device": str(model.device),
    }


def run_sample(cfg: Config, store: RunStore) -> dict[str, Any]:
    started = time.monotonic()
    model = load_stage2(cfg, store, pick_device(cfg))
    s2, classes = cfg.stage2, model.cfg.data.classes
    log.info("sample.start", checkpoint=model.checkpoint.name, per_class=s2.samples_per_class,
             steps=s2.sample_steps, temperature=s2.temperature, seed=s2.sample_seed)
    frames, labels = generate_class_videos(model, s2.samples_per_class, s2.sample_steps, s2.temperature, s2.sample_seed)
    videos = []
    for position, (video, label) in enumerate(zip(frames.numpy(), labels.tolist())):
        name = classes[label]
        stem = f"{Layout.samples}/{name}-{position % max(s2.samples_per_class, 1)}"
        store.write_bytes(f"{stem}.png", strip_png(video))
        store.write_bytes(f"{stem}.gif", animated_gif(video))
        store.write_bytes(f"{stem}.npy", npy_bytes(video.astype(np.float32)))
        videos.append({
            "class": name, "class_id": label,
            "png": f"{stem}.png".split("/", 1)[1], "gif": f"{stem}.gif".split("/", 1)[1], "npy": f"{stem}.npy".split("/", 1)[1],
        })
    index = {
        **_settings(cfg, model),
        "samples_per_class": s2.samples_per_class,
        "classes": list(classes),
        "frames": "npy: float32 (T, H, W) in [0, 1]; png: the frames left to right; gif: one frame each",
        "shape": list(frames.shape[1:]),
        "videos": videos,
        "seconds": round(time.monotonic() - started, 2),
        "created_at": utc_now(),
    }
    store.write_json(SAMPLES_INDEX, index)
    log.info("sample.done", videos=len(videos), seconds=index["seconds"])
    print(f"sample: {len(videos)} videos ({s2.samples_per_class} per class, {s2.sample_steps} steps, temperature "
          f"{s2.temperature:g}, seed {s2.sample_seed}) from {model.checkpoint.name} in {index['seconds']:.1f} s\n"
          f"index: {store.uri.rstrip('/')}/{SAMPLES_INDEX}", flush=True)
    return index


def run_predict(cfg: Config, store: RunStore) -> dict[str, Any]:
    from job.evaluate_stage2 import prediction_scores, prediction_summary
    from job.plots import reconstruction_grid_png

    started = time.monotonic()
    model = load_stage2(cfg, store, pick_device(cfg))
    run_cfg, classes = model.cfg, model.cfg.data.classes
    dataset = prepare_dataset(run_cfg, store)
    indices = prediction_indices(dataset, cfg.stage2.eval_videos)
    given = given_video_frames(model)
    log.info("predict.start", checkpoint=model.checkpoint.name, videos=len(indices), given_frames=given)
    predicted, truth, labels = predict_test_videos(model, dataset, indices, cfg)
    threshold = run_cfg.model.foreground_threshold
    scores = prediction_scores(predicted, truth, given, threshold)
    videos = []
    for row, (index, label) in enumerate(zip(indices.tolist(), labels.tolist())):
        name = f"{Layout.predictions}/{index}.png"
        png = reconstruction_grid_png(
            predicted[row : row + 1].numpy(), truth[row : row + 1].numpy(), [f"{classes[label]} #{index}"],
            f"{classes[label]} #{index}: frames {given}+ predicted from frames 0-{given - 1} ({model.checkpoint.name})",
            kinds=("predicted", "true"),
        )
        store.write_bytes(name, png)
        own = prediction_summary(scores[MODEL_KIND].select(torch.tensor([row])), given)
        videos.append({
            "index": index, "class": classes[label], "png": name.split("/", 1)[1],
            "psnr_db": own["psnr_db"], "centroid_error_px": own["centroid_error_px"],
            "centroid_misses": own["centroid_misses"],
        })
    index_json = {
        **_settings(cfg, model),
        "split": "test",
        "given_frames": given,
        "given_latent_frames": model.transformer.predict_frames(),
        "frames": list(truth.shape[1:]),
        "videos": videos,
        "summary": {kind: prediction_summary(kind_scores, given) for kind, kind_scores in scores.items()},
        "seconds": round(time.monotonic() - started, 2),
        "created_at": utc_now(),
    }
    store.write_json(PREDICTIONS_INDEX, index_json)
    summary = index_json["summary"]
    log.info("predict.done", videos=len(videos), seconds=index_json["seconds"])
    print(
        f"predict: {len(videos)} test videos, frames {given}+ predicted, from {model.checkpoint.name} in "
        f"{index_json['seconds']:.1f} s\n" + "\n".join(
            f"{kind}: PSNR {_fmt(s['psnr_db'], '{:.2f}')} dB, centroid error {_fmt(s['centroid_error_px'], '{:.3f}')} px, "
            f"{s['centroid_misses']} misses" for kind, s in summary.items()
        ) + f"\nindex: {store.uri.rstrip('/')}/{PREDICTIONS_INDEX}",
        flush=True,
    )
    return index_json


MODEL_KIND = "model"


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)
