"""The tokenizer's side of ``evaluate``: one pass over the train split (the mean-frame baseline and the
codes the probe learns from), one over the test split (the model and both baselines through
the same per-frame metric code), per-class numbers, the judges of codes' test accuracy and the example
images."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from job.config import Config
from job.data.dataset import VideoDataset
from job.eval.frame_metrics import BLACK, MEAN_FRAME, MODEL, FrameScores, score_frames, summarise
from job.eval.code_judges import CodeJudges, fit_code_judges
from job.eval.probe import confusion_matrix
from job.models.tokenizer import VideoTokenizer
from job.plots.charts import reconstruction_grid_png
from job.runtime.signals import stop_point
from job.storage import Layout, RunStore

EXAMPLES_PER_CLASS = 3


KINDS = (MODEL, BLACK, MEAN_FRAME)


def batches(dataset: VideoDataset, indices: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(indices), batch_size):
        stop_point("evaluating")  # the report is written only at the end
        yield dataset.get(indices[start : start + batch_size])


def reconstruct(model: VideoTokenizer, videos: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, reconstruction (N, T, H, W)) through the tokenizer's public encode -> decode path."""
    codes = model.encode(videos.to(device))
    return codes, model.decode(codes)[:, 0].float()


@dataclass
class TrainPass:
    mean_frame: torch.Tensor  # (T, H, W): the per-pixel mean over the train split
    codes: torch.Tensor  # (N, t, h, w): every train video's codes
    labels: torch.Tensor  # (N,)


@torch.no_grad()
def scan_train_split(model: VideoTokenizer, dataset: VideoDataset, cfg: Config, device: torch.device) -> TrainPass:
    indices = dataset.split("train")
    total = torch.zeros(model.input_shape, dtype=torch.float64)
    codes, labels = [], []
    for videos, batch_labels in batches(dataset, indices, cfg.train.batch_size):
        total += videos[:, 0].sum(dim=0, dtype=torch.float64)
        codes.append(model.encode(videos.to(device)).cpu())
        labels.append(batch_labels)
    return TrainPass((total / len(indices)).float(), torch.cat(codes), torch.cat(labels))


def fit_code_classifier(train_pass: TrainPass, cfg: Config, device: torch.device) -> CodeJudges:
    """The code classifier: both judges of codes (job.eval.code_judges), fitted on the train pass's codes."""
    return fit_code_judges(train_pass.codes, train_pass.labels, cfg.model.codebook_bits, len(cfg.data.classes), device)


@dataclass
class TestPass:
    scores: dict[str, FrameScores]  # by kind (model and baselines)
    codes: torch.Tensor  # (N, t, h, w)
    objects: torch.Tensor  # (N, t, h, w) bool: the latent cells that hold object pixels
    labels: torch.Tensor
    indices: np.ndarray  # dataset indices of the test samples, in order


@torch.no_grad()
def score_test_split(
    model: VideoTokenizer, dataset: VideoDataset, cfg: Config, device: torch.device, mean_frame: torch.Tensor
) -> TestPass:
    indices = dataset.split("test")
    threshold = cfg.model.foreground_threshold
    mean_frame = mean_frame.to(device)
    scores: dict[str, list[FrameScores]] = {kind: [] for kind in KINDS}
    codes, objects, labels = [], [], []
    for videos, batch_labels in batches(dataset, indices, cfg.train.batch_size):
        batch_codes, recon = reconstruct(model, videos, device)
        objects.append(model.object_cells(videos, threshold))
        target = videos[:, 0].to(device)
        candidates = {MODEL: recon, BLACK: torch.zeros_like(target), MEAN_FRAME: mean_frame.expand_as(target)}
        for kind, candidate in candidates.items():
            scores[kind].append(score_frames(candidate, target, threshold).cpu())
        codes.append(batch_codes.cpu())
        labels.append(batch_labels)
    return TestPass({k: FrameScores.cat(v) for k, v in scores.items()}, torch.cat(codes), torch.cat(objects),
                    torch.cat(labels), indices)


def per_class_metrics(test_pass: TestPass, classes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    result = {}
    for class_id, name in enumerate(classes):
        samples = test_pass.labels == class_id
        result[name] = {"samples": int(samples.sum())}
        result[name].update({kind: summarise(test_pass.scores[kind].select(samples)) for kind in KINDS})
    return result


def classify_codes(judges: CodeJudges, train_pass: TrainPass, test_pass: TestPass, cfg: Config) -> dict[str, Any]:
    """Can the codes tell the trajectories apart? The code probe, scored on the test split's codes,
    and beside it the code-track judge: a linear read-out of per-position bits sees a class in codes
    that say which way the object moves (a halo around it), not in where a clean object's codes lie
    over time (docs/generation.md)."""
    classes = list(cfg.data.classes)
    bits = cfg.model.codebook_bits
    predicted = judges.by_probe(test_pass.codes)
    confusion = confusion_matrix(test_pass.labels, predicted, len(classes))
    t, h, w = test_pass.codes.shape[1:]
    by_track = judges.by_track(test_pass.codes)
    return {
        "accuracy": float((predicted == test_pass.labels).double().mean()),
        "track_accuracy": float((by_track == test_pass.labels).double().mean()),
        "track_judge": "the centroid track of the cells whose code is not the train split's most common one, "
        "classified by a linear probe on the pixel track judge's features (speeds, accelerations, turns)",
        "chance": 1.0 / len(classes),
        "confusion_matrix": confusion.tolist(),
        "classes": classes,
        "features": f"LFQ code bits as +-1 at every latent position, standardised: {t}x{h}x{w} positions x {bits} bits"
        f" = {t * h * w * bits} features",
        "probe": "multinomial logistic regression, L2 1e-2, full-batch L-BFGS from zero weights (deterministic), "
        "trained on the train videos as they are",
        "train_samples": len(train_pass.labels),
        "test_samples": len(test_pass.labels),
    }


@torch.no_grad()
def write_example_images(
    store: RunStore, model: VideoTokenizer, dataset: VideoDataset, test_pass: TestPass, cfg: Config,
    device: torch.device, checkpoint_name: str,
) -> dict[str, str]:
    """eval/<class>.png: the first few test samples of each class, original | reconstruction | error."""
    images = {}
    for class_id, name in enumerate(cfg.data.classes):
        chosen = test_pass.indices[(test_pass.labels == class_id).numpy()][:EXAMPLES_PER_CLASS]
        if not len(chosen):
            continue
        videos, _ = dataset.get(chosen)
        _, recon = reconstruct(model, videos, device)
        png = reconstruction_grid_png(
            videos[:, 0].numpy(), recon.cpu().numpy(), [f"{name} #{i}" for i in chosen],
            f"{name}, test split, {checkpoint_name}: original | reconstruction | error",
        )
        images[name] = f"{Layout.eval}/{name}.png"
        store.write_bytes(images[name], png)
    return images
