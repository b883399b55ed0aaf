"""``sample``: class-conditional videos from the trained stage 2 into samples/ (docs/generation.md)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import structlog

from job.config import Config
from job.exits import EXIT_OK
from job.inference.load import load_generator
from job.inference.videos import generate_class_videos
from job.modes.common import open_run
from job.monitoring.progress import utc_now
from job.plots.media import animated_gif, npy_bytes, strip_png
from job.runtime.device import pick_device
from job.storage import Layout, RunStore

log = structlog.get_logger("job.sampling")


def run(cfg: Config, store: RunStore) -> dict[str, Any]:
    started = time.monotonic()
    model = load_generator(cfg, store, pick_device(cfg))
    s2, classes = model.cfg.stage2, model.cfg.data.classes
    log.info("sample.start", checkpoint=model.checkpoint.name, per_class=s2.samples_per_class,
             steps=s2.sample_steps, temperature=s2.temperature, seed=s2.sample_seed)
    frames, labels = generate_class_videos(model)
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
        **model.settings(),
        "samples_per_class": s2.samples_per_class,
        "classes": list(classes),
        "frames": "npy: float32 (T, H, W) in [0, 1]; png: the frames left to right; gif: one frame each",
        "shape": list(frames.shape[1:]),
        "videos": videos,
        "seconds": round(time.monotonic() - started, 2),
        "created_at": utc_now(),
    }
    store.write_json(Layout.samples_index, index)
    log.info("sample.done", videos=len(videos), seconds=index["seconds"])
    print(f"sample: {len(videos)} videos ({s2.samples_per_class} per class, {s2.sample_steps} steps, temperature "
          f"{s2.temperature:g}, seed {s2.sample_seed}) from {model.checkpoint.name} in {index['seconds']:.1f} s\n"
          f"index: {store.uri.rstrip('/')}/{Layout.samples_index}", flush=True)
    return index


def main(cfg: Config, run_uri: str, cache_dir: str | None) -> int:
    open_run(run, cfg, run_uri, cache_dir)
    return EXIT_OK
