"""The code probe of ``evaluate`` (job.eval.probe): code bits, the linear probe
and the confusion matrix, on crafted codes."""

from __future__ import annotations

import pytest
import torch

from job.eval.probe import code_bits, confusion_matrix, fit_linear_probe

pytestmark = pytest.mark.timeout(60)


def test_code_bits_unpack_lfq_codes_to_signs():
    codes = torch.tensor([[[[0, 5]]]])  # (1, 1, 1, 2): 0 = 000, 5 = 101 (bit 0 first)
    assert code_bits(codes, 3).tolist() == [[-1.0, -1.0, -1.0, 1.0, -1.0, 1.0]]


def test_linear_probe_separates_separable_codes():
    generator = torch.Generator().manual_seed(0)
    num_classes, bits = 4, 3

    def samples(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Random codes everywhere except one latent position, which holds the class id.
        labels = torch.arange(n) % num_classes
        codes = torch.randint(0, 2**bits, (n, 1, 2, 2), generator=generator)
        codes[:, 0, 1, 0] = labels
        return codes, labels

    train_codes, train_labels = samples(200)
    test_codes, test_labels = samples(40)
    probe = fit_linear_probe(code_bits(train_codes, bits), train_labels, num_classes)
    predicted = probe.predict(code_bits(test_codes, bits))
    assert torch.equal(predicted, test_labels)
    confusion = confusion_matrix(test_labels, predicted, num_classes)
    assert torch.equal(confusion, torch.diag(torch.full((num_classes,), 10)))


def test_linear_probe_is_deterministic():
    features = code_bits(torch.randint(0, 8, (30, 1, 2, 2), generator=torch.Generator().manual_seed(1)), 3)
    labels = torch.arange(30) % 3
    first, second = (fit_linear_probe(features, labels, 3) for _ in range(2))
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)


def test_confusion_matrix_rows_are_true_classes():
    confusion = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]), 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_constant_features_get_no_weight_and_cost_no_precision():
    """The background's bits are the same in every video: they must not move the probe."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.arange(64) % 2
    informative = torch.where(labels[:, None].bool(), 1.0, -1.0) * torch.ones(64, 3)
    noise = torch.randint(0, 2, (64, 5), generator=generator).float() * 2 - 1
    constant = torch.full((64, 200), 1.0)
    probe = fit_linear_probe(torch.cat([informative, noise, constant], dim=1), labels, 2)
    assert torch.count_nonzero(probe.weight[:, 8:]) == 0
    assert torch.equal(probe.predict(torch.cat([informative, noise, constant], dim=1)), labels)
