"""Plots for the run folder (SPEC §4 `plots/`): loss curves and reconstruction grids, as PNG bytes.

Figures are built with `Figure` + `FigureCanvasAgg`, never pyplot: no global backend switch, no
window, and no shared "current figure", so the heartbeat or a training thread can render safely.
The caller stores the bytes through its own storage layer; nothing here touches the filesystem.
During training the drawing happens in a worker process (job.plot_worker), not in the training one.
Imports no torch, so that a laptop can redraw plots from a run folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

DPI = 90
MAX_FRAMES_PER_ROW = 8
FRAME_INCHES = 1.1  # displayed size of one frame, whatever its pixel size, so 16x16 frames stay legible
ERROR_CMAP = "magma"
# Between frames of a strip: NaN pixels, drawn in the colormap's "bad" colour, so no extra axes are needed.
FRAME_GAP_PIXELS = 2
# A wider gap before the max-over-time frame marks it as a different kind of image from the frames.
PROJECTION_GAP_PIXELS = 3 * FRAME_GAP_PIXELS

Series = tuple[list[float], list[float]]


def loss_curves_png(metrics: list[dict[str, Any]]) -> bytes:
    """Losses, learning rate and codebook health per epoch, from metrics.jsonl records."""
    if not metrics:
        return _message_png("no epochs yet")
    figure = Figure(figsize=(8, 9), dpi=DPI, layout="constrained")
    loss_axes, lr_axes, codebook_axes = figure.subplots(3, 1, sharex=True)
    _plot_losses(loss_axes, metrics)
    _plot_learning_rate(lr_axes, metrics)
    _plot_codebook(codebook_axes, metrics)
    codebook_axes.set_xlabel("epoch")
    # min_n_ticks=1: with a single epoch the default falls back to fractional ticks like 0.975.
    codebook_axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    epochs = "1 epoch" if len(metrics) == 1 else f"{len(metrics)} epochs"
    figure.suptitle(f"Training curves ({epochs})", fontsize=13)
    return _png_bytes(figure)


def reconstruction_grid_png(
    originals: np.ndarray, reconstructions: np.ndarray, labels: list[str], title: str
) -> bytes:
    """Per sample: original, reconstruction and |error| strips, each ending in a max-over-time frame.

    `originals` and `reconstructions` are (N, T, H, W) in [0, 1]; at most MAX_FRAMES_PER_ROW frames
    are shown, evenly spaced, but the max-over-time frame always covers the whole clip.
    """
    originals, reconstructions = _checked_videos(originals, reconstructions, labels)
    errors = np.abs(originals - reconstructions)
    n_samples, n_frames, height, width = originals.shape
    shown = _evenly_spaced_frames(n_frames)
    strip_columns = len(shown) + 1

    # "compressed" rather than "constrained": the plain constrained layout misplaces fixed-aspect
    # images and clips the longest row label at the left edge.
    figure = Figure(figsize=_grid_figsize(n_samples, strip_columns, height, width), dpi=DPI, layout="compressed")
    grid = figure.add_gridspec(3 * n_samples, 2, width_ratios=[strip_columns, 0.12])
    for sample, label in enumerate(labels):
        rows = [
            (originals[sample], "original"),
            (reconstructions[sample], "reconstruction"),
            (errors[sample], "|error|"),
        ]
        _draw_sample(figure, grid, 3 * sample, rows, label, shown)
    figure.suptitle(title, fontsize=12)
    return _png_bytes(figure)


def _draw_sample(
    figure: Figure, grid: GridSpec, first_row: int, rows: list[tuple[np.ndarray, str]], label: str, shown: np.ndarray
) -> None:
    """The strips of one sample from grid row `first_row` on; the last one, |error|, gets a colormap and colorbar."""
    gray, error_cmap = _with_gap_colour("gray"), _with_gap_colour(ERROR_CMAP)
    width = rows[0][0].shape[2]
    for offset, (video, kind) in enumerate(rows):
        axes = figure.add_subplot(grid[first_row + offset, 0])
        cmap = error_cmap if offset == len(rows) - 1 else gray
        image = axes.imshow(_strip(video, shown), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        _label_strip(axes, f"{label} {kind}", shown, width, with_frame_names=first_row + offset == 0)
    colorbar = figure.colorbar(image, cax=figure.add_subplot(grid[first_row + len(rows) - 1, 1]))
    colorbar.ax.tick_params(labelsize=7)


def _plot_losses(axes: Axes, metrics: list[dict[str, Any]]) -> None:
    # train_loss includes the LFQ entropy term and can go negative: it keeps a linear axis, while the
    # strictly positive validation errors span decades and get their own log axis.
    train_epochs, train_values = _series(metrics, "train_loss")
    axes.plot(train_epochs, train_values, "o-", color="tab:blue", markersize=3, label="train_loss")
    axes.set_ylabel("train loss (linear)")
    axes.grid(True, alpha=0.3)
    validation_axes = axes.twinx()
    for key, colour in (("val_loss", "tab:orange"), ("val_mse", "tab:green")):
        epochs, values = _series(metrics, key, positive_only=True)
        validation_axes.plot(epochs, values, "s--", color=colour, markersize=3, label=key)
    validation_axes.set_yscale("log")
    validation_axes.set_ylabel("validation (log)")
    _panel_header(axes, "Losses", validation_axes)


def _plot_learning_rate(axes: Axes, metrics: list[dict[str, Any]]) -> None:
    epochs, values = _series(metrics, "lr")
    axes.plot(epochs, values, "o-", color="tab:purple", markersize=3, label="lr")
    if values and max(values) > 0:
        # Anchored at 0 (a schedule decays towards it); a constant lr would otherwise get a
        # hair-thin range whose tick labels all round to the same text.
        axes.set_ylim(0.0, 1.1 * max(values))
    # Tick labels carry their own exponent: matplotlib's shared offset text would collide with the header.
    axes.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
    axes.set_ylabel("learning rate")
    axes.grid(True, alpha=0.3)
    _panel_header(axes, "Learning rate")


def _plot_codebook(axes: Axes, metrics: list[dict[str, Any]]) -> None:
    epochs, values = _series(metrics, "codebook_usage")
    axes.plot(epochs, values, "o-", color="tab:red", markersize=3, label="codebook_usage")
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel("usage (fraction of codes)")
    axes.grid(True, alpha=0.3)
    perplexity_axes = axes.twinx()
    epochs, values = _series(metrics, "codebook_perplexity")
    perplexity_axes.plot(epochs, values, "s--", color="tab:cyan", markersize=3, label="codebook_perplexity")
    perplexity_axes.set_ylabel("perplexity")
    _panel_header(axes, "Codebook", perplexity_axes)


def _series(metrics: list[dict[str, Any]], key: str, positive_only: bool = False) -> Series:
    """(epochs, values) of one key, skipping records where it is missing, null or not finite.

    Records without an "epoch" (older lines) fall back to their 1-based position, as epochs count from 1.
    """
    epochs: list[float] = []
    values: list[float] = []
    for position, record in enumerate(metrics, start=1):
        value = _finite_or_none(record.get(key))
        if value is None or (positive_only and value <= 0):
            continue
        epoch = _finite_or_none(record.get("epoch"))
        epochs.append(position if epoch is None else epoch)
        values.append(value)
    return epochs, values


def _finite_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _panel_header(axes: Axes, title: str, twin: Axes | None = None) -> None:
    """Title on the left, legend on the right, both above the panel.

    Inside the panel, loc="best" only avoids the lines of its own axes, so it would cover the twin's.
    """
    axes.set_title(title, loc="left", fontsize=11)
    handles, labels = axes.get_legend_handles_labels()
    if twin is not None:
        twin_handles, twin_labels = twin.get_legend_handles_labels()
        handles, labels = handles + twin_handles, labels + twin_labels
    axes.legend(
        handles, labels, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(labels), fontsize=8, frameon=False
    )


def _message_png(message: str) -> bytes:
    figure = Figure(figsize=(8, 3), dpi=DPI)
    figure.text(0.5, 0.5, message, ha="center", va="center", fontsize=16, color="dimgray")
    return _png_bytes(figure)


def _checked_videos(
    originals: np.ndarray, reconstructions: np.ndarray, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    originals = np.asarray(originals, dtype=np.float32)
    reconstructions = np.asarray(reconstructions, dtype=np.float32)
    if originals.ndim != 4 or originals.shape != reconstructions.shape:
        raise ValueError(
            f"expected two (N, T, H, W) arrays of the same shape, got {originals.shape} and {reconstructions.shape}"
        )
    if originals.shape[0] == 0 or originals.shape[1] == 0:
        raise ValueError(f"nothing to draw: shape {originals.shape}")
    if len(labels) != originals.shape[0]:
        raise ValueError(f"{len(labels)} labels for {originals.shape[0]} samples")
    return originals, reconstructions


def _evenly_spaced_frames(n_frames: int) -> np.ndarray:
    count = min(n_frames, MAX_FRAMES_PER_ROW)
    return np.linspace(0, n_frames - 1, count).round().astype(int)


def _strip(video: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """The shown frames and the max-over-time projection side by side, separated by gap columns."""
    height = video.shape[1]
    gap = np.full((height, FRAME_GAP_PIXELS), np.nan, dtype=np.float32)
    projection_gap = np.full((height, PROJECTION_GAP_PIXELS), np.nan, dtype=np.float32)
    pieces: list[np.ndarray] = []
    for frame in video[shown]:
        pieces.extend([frame, gap])
    pieces[-1] = projection_gap
    pieces.append(video.max(axis=0))
    return np.concatenate(pieces, axis=1)


def _label_strip(axes: Axes, row_label: str, shown: np.ndarray, width: int, with_frame_names: bool) -> None:
    axes.set_ylabel(row_label, rotation=0, ha="right", va="center", fontsize=9)
    axes.set_yticks([])
    # The frame around a strip would run across the white gaps and blur where frames start and end.
    axes.set_frame_on(False)
    if not with_frame_names:
        axes.set_xticks([])
        return
    step = width + FRAME_GAP_PIXELS
    centres = [index * step + (width - 1) / 2 for index in range(len(shown))]
    centres.append((len(shown) - 1) * step + width + PROJECTION_GAP_PIXELS + (width - 1) / 2)
    axes.set_xticks(centres, [f"t={frame}" for frame in shown] + ["max over t"], fontsize=8)
    axes.xaxis.tick_top()
    axes.tick_params(axis="x", length=0)


def _with_gap_colour(name: str) -> Colormap:
    return colormaps[name].with_extremes(bad="white")


def _grid_figsize(n_samples: int, strip_columns: int, height: int, width: int) -> tuple[float, float]:
    label_inches, colorbar_inches, title_inches = 1.9, 0.7, 0.7
    row_inches = FRAME_INCHES * height / width + 0.08
    return (label_inches + strip_columns * FRAME_INCHES + colorbar_inches, title_inches + 3 * n_samples * row_inches)


def _png_bytes(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = BytesIO()
    # No "Software" entry: the bytes then depend only on the inputs and the matplotlib version.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


# What the plot worker (job.plot_worker) can draw, by the name a request gives.
RENDERERS: dict[str, Callable[..., bytes]] = {
    "loss_curves": loss_curves_png,
    "reconstruction_grid": reconstruction_grid_png,
}
