"""Stage 2's validation health (metrics.jsonl, evaluate's stage2_validation): what a planted model
that knows the object only under the true class must score."""

import math

import torch

from job.models.transformer import MaskedBatch
from job.training.tasks.transformer import health_sums, health_metrics

CODES, BACKGROUND, CLASSES = 8, 0, 2


def planted_batch() -> tuple[MaskedBatch, torch.Tensor, torch.Tensor]:
    """Two videos of 10 tokens, all masked; the object (code 5) on 2 of each video's 10 cells."""
    targets = torch.full((2, 10), BACKGROUND)
    objects = torch.zeros(2, 10, dtype=torch.bool)
    objects[:, 3:5] = True
    targets[objects] = 5
    masked = torch.ones(2, 10, dtype=torch.bool)
    labels = torch.tensor([0, 1])
    return MaskedBatch(torch.full_like(targets, CODES), torch.full_like(labels, CLASSES), targets, masked), objects, labels


def test_a_class_used_only_on_the_object_shows_on_the_object_tokens_undiluted():
    batch, objects, labels = planted_batch()

    def model(tokens: torch.Tensor, classes: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        # Background certain everywhere but on the object's cells; there, the object's code is
        # certain under the true class and one of the 8 codes at random under any other.
        logits = torch.zeros(2, 10, CODES)
        logits[..., BACKGROUND] = 30.0
        logits[objects] = 0.0
        knows = objects & (classes == labels)[:, None]
        logits[knows, 5] = 30.0
        return logits[at]

    lookup = torch.full((10,), BACKGROUND)
    metrics = health_metrics(health_sums(model, batch, objects, labels, lookup, CLASSES), videos=2)

    assert math.isclose(metrics["val_class_effect_object_nats"], math.log(CODES), abs_tol=1e-4)
    # Averaged over all masked tokens, 80% of them background, the same effect is a fifth as large.
    assert math.isclose(metrics["val_class_effect_nats"], 0.2 * math.log(CODES), abs_tol=1e-4)
    # The task's own conditioning here is "no class": on the object the model is guessing.
    assert math.isclose(metrics["val_object_loss"], math.log(CODES), abs_tol=1e-4)
    # Argmax accuracy sees none of it: ties on the object go to the background's code.
    assert metrics["val_object_accuracy"] == 0.0
    assert math.isclose(metrics["val_accuracy"], 0.8, abs_tol=1e-6) and metrics["val_lookup_accuracy"] == 0.8
    assert metrics["val_gain_over_lookup"] == 0.0


def test_the_true_class_pass_runs_only_on_the_samples_whose_task_withheld_their_class():
    """Validation's class effect needs each sample's loss under its true class; a sample of the
    class task was scored so already, and only the others are passed through the model again."""
    labels = torch.tensor([0, 1])
    targets = torch.full((2, 10), BACKGROUND)
    objects = torch.zeros(2, 10, dtype=torch.bool)
    objects[:, 3:5] = True
    targets[objects] = 5
    masked = torch.ones(2, 10, dtype=torch.bool)
    masked[:, 0] = False  # a visible token names the video, so that the model below knows which it sees
    tokens = torch.full_like(targets, CODES)
    tokens[:, 0] = torch.tensor([6, 7])
    batch = MaskedBatch(tokens, torch.tensor([0, CLASSES]), targets, masked)  # video 0 was given its class
    rows_seen = []

    def model(tokens: torch.Tensor, classes: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        rows_seen.append(len(tokens))
        video = tokens[:, 0] - 6
        logits = torch.zeros(len(tokens), 10, CODES)
        logits[..., BACKGROUND] = 30.0
        logits[objects[video]] = 0.0
        knows = objects[video] & (classes == labels[video])[:, None]
        logits[knows, 5] = 30.0
        return logits[at]

    metrics = health_metrics(health_sums(model, batch, objects, labels, torch.full((10,), BACKGROUND), CLASSES), videos=2)

    assert rows_seen == [2, 1, 2]  # the batch's pass, video 1 under its class, both under a wrong one
    assert math.isclose(metrics["val_class_effect_object_nats"], math.log(CODES), abs_tol=1e-4)
    assert math.isclose(metrics["val_object_loss"], math.log(CODES) / 2, abs_tol=1e-4)  # video 0 knows it
