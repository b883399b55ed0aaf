"""``predict``: the trained stage 2 continues test videos from their first frames; predicted | true
| error strips into predictions/ (docs/generation.md)."""

from __future__ import annotations

import time
from typing import Any

import structlog
import torch

from job.config import Config
from job.data.dataset import prepare_dataset
from job.eval.frame_metrics import MODEL
from job.eval.prediction import prediction_scores, prediction_summary
from job.eval.report import formatted
from job.exits import EXIT_OK
from job.inference.load import load_generator
from job.inference.videos import (
    given_video_frames,
    predict_test_videos,
    prediction_indices,
    prediction_settings,
)
from job.modes.common import open_run
from job.monitoring.progress import utc_now
from job.plots.charts import reconstruction_grid_png
from job.runtime.device import pick_device
from job.storage import Layout, RunStore

log = structlog.get_logger("job.sampling")


def run(cfg: Config, store: RunStore) -> dict[str, Any]:
    started = time.monotonic()
    model = load_generator(cfg, store, pick_device(cfg))
    run_cfg, classes = model.cfg, model.cfg.data.classes
    dataset = prepare_dataset(run_cfg, store)
    indices = prediction_indices(dataset, run_cfg.stage2.eval_videos)
    given = given_video_frames(model)
    log.info("predict.start", checkpoint=model.checkpoint.name, videos=len(indices), given_frames=given)
    predicted, truth, labels = predict_test_videos(model, dataset, indices)
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
        own = prediction_summary(scores[MODEL].select(torch.tensor([row])), given)
        videos.append({
            "index": index, "class": classes[label], "png": name.split("/", 1)[1],
            "psnr_db": own["psnr_db"], "centroid_error_px": own["centroid_error_px"],
            "centroid_misses": own["centroid_misses"], "frames_without_object": own["frames_without_object"],
        })
    index_json = {
        **model.settings(),
        "split": "test",
        "given_frames": given,
        "given_latent_frames": model.transformer.predict_frames(),
        **prediction_settings(model),
        "frames": list(truth.shape[1:]),
        "videos": videos,
        "summary": {kind: prediction_summary(kind_scores, given) for kind, kind_scores in scores.items()},
        "seconds": round(time.monotonic() - started, 2),
        "created_at": utc_now(),
    }
    store.write_json(Layout.predictions_index, index_json)
    summary = index_json["summary"]
    log.info("predict.done", videos=len(videos), seconds=index_json["seconds"])
    print(
        f"predict: {len(videos)} test videos, frames {given}+ predicted, from {model.checkpoint.name} in "
        f"{index_json['seconds']:.1f} s\n" + "\n".join(
            f"{kind}: PSNR {formatted(s['psnr_db'], '{:.2f}')} dB, centroid error {formatted(s['centroid_error_px'], '{:.3f}')} px, "
            f"{s['centroid_misses']} misses, {s['frames_without_object']} of {s['object_frames']} frames without a "
            "visible object" for kind, s in summary.items()
        ) + f"\nindex: {store.uri.rstrip('/')}/{Layout.predictions_index}",
        flush=True,
    )
    return index_json


def main(cfg: Config, run_uri: str, cache_dir: str | None) -> int:
    open_run(run, cfg, run_uri, cache_dir)
    return EXIT_OK
