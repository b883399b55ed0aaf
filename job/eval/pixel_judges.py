"""Judges of generated videos that look at pixels, not codes (a code probe can be fooled by codes no
real video has): how many objects a frame shows, a classifier on the object's track, and a small
video classifier trained on real videos whose features a Fréchet distance compares (FVD's idea,
our features)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from job.eval.frame_metrics import centroids
from job.eval.probe import LinearProbe, fit_linear_probe


def track_features(frames: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, F) what a trajectory's class shows in its centroids (N, T, 2), unchanged by where the path
    lies and how it is turned in the image: speeds, accelerations, and the turn between steps."""
    c = torch.nan_to_num(centroids(frames, threshold).double(), nan=0.0)
    v = c[:, 1:] - c[:, :-1]
    a = v[:, 1:] - v[:, :-1]
    turn = v[:, :-1, 0] * v[:, 1:, 1] - v[:, :-1, 1] * v[:, 1:, 0]
    along = (v[:, :-1] * v[:, 1:]).sum(-1)
    return torch.cat([v.norm(dim=-1), a.norm(dim=-1), turn, turn.abs(), along], dim=1).float()


def fit_track_judge(frames: torch.Tensor, labels: torch.Tensor, classes: int, threshold: float) -> LinearProbe:
    """A linear classifier of the class from the track features of real videos."""
    return fit_linear_probe(track_features(frames, threshold), labels, classes)


class VideoClassifier(nn.Module):
    """A small 3D-conv classifier of (N, T, H, W) videos; ``features`` is its penultimate layer."""

    def __init__(self, classes: int, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(1, width, 3, stride=(1, 2, 2), padding=1), nn.SiLU(),
            nn.Conv3d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv3d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.head = nn.Linear(2 * width, classes)

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        return self.body(videos[:, None].float()).mean(dim=(2, 3, 4))

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(videos))


def train_video_classifier(
    frames: torch.Tensor, labels: torch.Tensor, classes: int, epochs: int = 12, batch: int = 64, seed: int = 0,
) -> VideoClassifier:
    """Trained on real videos only, deterministically (its own seed; torch's global generator is
    left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = VideoClassifier(classes)
        order = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        with torch.enable_grad():
            for _ in range(epochs):
                for chosen in torch.randperm(len(frames), generator=order).split(batch):
                    loss = F.cross_entropy(net(frames[chosen]), labels[chosen])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
    return net.eval()


@torch.no_grad()
def video_features(net: VideoClassifier, frames: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([net.features(frames[s : s + batch]) for s in range(0, len(frames), batch)]).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two sets of feature rows (N, D)."""
    mu_a, mu_b = a.double().mean(0), b.double().mean(0)
    s_a, s_b = torch.cov(a.double().T), torch.cov(b.double().T)
    # tr((S_a S_b)^(1/2)) = sum of sqrt of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), symmetric PSD.
    values, vectors = torch.linalg.eigh(s_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)


@dataclass
class PixelJudges:
    """The judges, trained on real train videos."""

    track: LinearProbe
    net: VideoClassifier
    threshold: float

    @staticmethod
    def fit(frames: torch.Tensor, labels: torch.Tensor, classes: int, threshold: float) -> PixelJudges:
        return PixelJudges(fit_track_judge(frames, labels, classes, threshold),
                           train_video_classifier(frames, labels, classes), threshold)

    def track_accuracy(self, frames: torch.Tensor, labels: torch.Tensor) -> float | None:
        if not len(frames):
            return None
        predicted = self.track.predict(track_features(frames, self.threshold))
        return float((predicted == labels).double().mean())

    def frechet(self, frames: torch.Tensor, real: torch.Tensor) -> float | None:
        """The Fréchet distance between two sets of videos on the classifier's features."""
        if len(frames) < 2 or len(real) < 2:
            return None
        return frechet_distance(video_features(self.net, frames), video_features(self.net, real))
