"""The linear probe: multinomial logistic regression on the LFQ bits of a video's codes, trained on
real videos; how evaluate measures what the codes say about the class, and which class a
generated video shows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_confusion_matrix


# Videos unpacked at a time: the float32 result is the only full-size tensor (a train split's
# bits are 100s of MB of features on the GPU preset; an int64 intermediate would be twice that again).
BITS_CHUNK = 256


def code_bits(codes: torch.Tensor, codebook_bits: int) -> torch.Tensor:
    """LFQ codes (N, t, h, w) -> their bits as +-1, flattened: (N, t*h*w*codebook_bits) float32.

    LFQ makes each code from the signs of ``codebook_bits`` latent channels, so the bits are the
    quantized latent itself; a code's integer value has no meaningful order."""
    shifts = torch.arange(codebook_bits, device=codes.device, dtype=torch.int32)
    bits = torch.empty(len(codes), math.prod(codes.shape[1:]) * codebook_bits, device=codes.device)
    for start in range(0, len(codes), BITS_CHUNK):
        chunk = codes[start : start + BITS_CHUNK].to(torch.int32).unsqueeze(-1)
        bits[start : start + BITS_CHUNK] = ((chunk >> shifts) & 1).flatten(1)
    return bits.mul_(2.0).sub_(1.0)


@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor  # (classes, features)
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return standardised_logits(features, self.mean, self.scale, self.weight, self.bias)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(dim=1)


def standardised_logits(
    features: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``((features - mean) / scale) @ weight.T + bias``, with the standardisation folded into the
    weights, so that no standardised copy of ``features`` is ever made (nor kept for backward)."""
    folded = weight / scale
    return features @ folded.T + (bias - folded @ mean)


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-2, iterations: int = 150
) -> LinearProbe:
    """Cross-entropy plus ``l2 / 2 * |W|^2``, minimised by full-batch L-BFGS from zero weights.
    ``iterations``: 150 classify the demo's test videos as well as 300 did, in half the time
    (docs/benchmarks.md).

    Deterministic without a seed: nothing is random (zero start, no mini-batches). The L2 term
    keeps the problem well posed when, as here, there are more features than samples and the
    classes are separable, where unregularised weights would grow without bound."""
    features = features.float()
    # Constant features (the background's bits) get an infinite scale: they contribute exactly 0
    # and get exactly no gradient (a tiny scale would magnify rounding in the folded form).
    variance, mean = torch.var_mean(features, dim=0, correction=0)
    std = variance.sqrt()
    scale = torch.where(std > 1e-6, std, torch.full_like(std, math.inf))
    weight = torch.zeros(num_classes, features.shape[1], device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = standardised_logits(features, mean, scale, weight, bias)
        loss = F.cross_entropy(logits, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers evaluate under no_grad
        optimizer.step(closure)
    return LinearProbe(mean, scale, weight.detach(), bias.detach())


def confusion_matrix(true: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (num_classes, num_classes): rows the true class, columns the predicted one
    (torchmetrics', whose arguments come the other way round)."""
    return multiclass_confusion_matrix(predicted.long(), true.long(), num_classes=num_classes)
