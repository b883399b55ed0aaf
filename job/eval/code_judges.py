"""The judges of codes: which class a clip's codes say, read two ways, both fitted on the train
split's codes. The linear probe on their LFQ bits reads which way a halo of codes says the object
moves; the code-track judge reads where the cells whose code is not the background's go over
time, the only place halo-free codes carry the class (docs/generation.md). ``evaluate`` scores
the test split's codes and the generated videos' (re-encoded) with the same two."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from job.eval.pixel_judges import track_features
from job.eval.probe import LinearProbe, code_bits, fit_linear_probe
from job.models.tokenizer import background_code

PROBE, CODE_TRACK = "linear_probe", "code_track"


def code_track_features(codes: torch.Tensor, background: int) -> torch.Tensor:
    """(N, F) the track of the cells (N, t, h, w) whose code is not ``background``, read as the
    pixel track judge reads an object's centroids: where the object's codes go, not which they are."""
    return track_features((codes != background).float(), 0.5)


@dataclass
class CodeJudges:
    probe: LinearProbe  # on the codes' LFQ bits
    track: LinearProbe  # on code_track_features
    background: int  # the train split's background_code
    codebook_bits: int

    def by_probe(self, codes: torch.Tensor) -> torch.Tensor:
        """(N,) class ids the probe reads from codes (N, t, h, w)."""
        return self.probe.predict(code_bits(codes.to(self.probe.weight.device), self.codebook_bits)).cpu()

    def by_track(self, codes: torch.Tensor) -> torch.Tensor:
        """(N,) class ids the code-track judge reads from codes (N, t, h, w)."""
        return self.track.predict(code_track_features(codes.cpu(), self.background))


def fit_code_judges(
    codes: torch.Tensor, labels: torch.Tensor, codebook_bits: int, num_classes: int, device: torch.device
) -> CodeJudges:
    """Both judges from train codes (N, t, h, w) and their labels. The probe is fitted on ``device``
    (the GPU preset's 8,000 videos are many features); the code track, a few numbers
    a clip, on the CPU."""
    probe = fit_linear_probe(code_bits(codes.to(device), codebook_bits), labels.to(device), num_classes)
    background = background_code(codes)
    track = fit_linear_probe(code_track_features(codes.cpu(), background), labels.cpu(), num_classes)
    return CodeJudges(probe, track, background, codebook_bits)


def trusted_judge(probe_accuracy: float | None, track_accuracy: float | None) -> str:
    """The judge of codes whose verdicts on real test videos are the more accurate: the one a
    generated video's class is read with. Chosen on real videos only, never on generated ones."""
    if track_accuracy is not None and (probe_accuracy is None or track_accuracy > probe_accuracy):
        return CODE_TRACK
    return PROBE
