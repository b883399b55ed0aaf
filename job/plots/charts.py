"""Plots for the run folder (docs/run-folder.md `plots/`): loss curves and reconstruction grids, as PNG bytes.

Figures are built with `Figure` + `FigureCanvasAgg`, never pyplot: no global backend switch, no
window, and no shared "current figure", so the heartbeat or a training thread can render safely.
The caller stores the bytes through its own storage layer; nothing here touches the filesystem.
During training the drawing happens in a worker process (job.plots.worker), not in the training one.
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
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

DPI = 90
MAX_FRAMES_PER_ROW = 8
FRAME_INCHES = 1.1  # displayed size of one frame, whatever its pixel size, so 16x16 frames stay legible
ERROR_CMAP = "magma"
# Between frames of a strip: NaN pixels, drawn in the colormap's "bad" colour, so no extra axes are needed.
FRAME_GAP_PIXELS = 2
# A wider gap before the max-over-time frame marks it as a different kind of image from the frames.
PROJECTION_GAP_PIXELS = 3 * FRAME_GAP_PIXELS
GRID_LABEL_POINTS = 9
TEXT_TO_PATH = TextToPath()

Series = tuple[list[float], list[float]]


def loss_curves_png(metrics: list[dict[str, Any]]) -> bytes:
    """Losses, learning rate and codebook health per epoch, from metrics.jsonl records."""
    if not metrics:
        return _message_png("no epochs yet")
    # Margins placed by hand, in inches: the constrained layout engine doubled the cost of a figure.
    width, height = 8.0, 9.0
    figure = Figure(figsize=(width, height), dpi=DPI)
    loss_axes, lr_axes, codebook_axes = figure.subplots(
        3, 1, sharex=True,
        gridspec_kw={
            "left": 1.0 / width, "right": 1.0 - 0.9 / width, "bottom": 0.55 / height, "top": 1.0 - 0.8 / height,
            "hspace": 0.18,
        },
    )
    _plot_losses(loss_axes, metrics)
    _plot_learning_rate(lr_axes, metrics)
    _plot_codebook(codebook_axes, metrics)
    codebook_axes.set_xlabel("epoch")
    # min_n_ticks=1: with a single epoch the default falls back to fractional ticks like 0.975.
    codebook_axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    epochs = "1 epoch" if len(metrics) == 1 else f"{len(metrics)} epochs"
    figure.suptitle(f"Training curves ({epochs})", fontsize=13, y=1.0 - 0.1 / height, va="top")
    return _png_bytes(figure)


def reconstruction_grid_png(
    originals: np.ndarray, reconstructions: np.ndarray, labels: list[str], title: str,
    kinds: tuple[str, str] = ("original", "reconstruction"),
) -> bytes:
    """Per sample: original, reconstruction and |error| strips, each ending in a max-over-time frame
    (``kinds`` names the first two rows: predict draws predicted | true | |error|).

    `originals` and `reconstructions` are (N, T, H, W) in [0, 1]; at most MAX_FRAMES_PER_ROW frames
    are shown, evenly spaced, but the max-over-time frame always covers the whole clip.

    The strips are coloured with numpy and drawn as one image in one axes placed by hand: an axes
    per strip under a layout engine cost ~0.4 CPU-s per figure, this ~0.1 (the plot worker shares
    the training machine's cores).
    """
    originals, reconstructions = _checked_videos(originals, reconstructions, labels)
    errors = np.abs(originals - reconstructions)
    n_samples, n_frames, height, width = originals.shape
    shown = _evenly_spaced_frames(n_frames)
    gray, error_cmap = _with_gap_colour("gray"), _with_gap_colour(ERROR_CMAP)

    strips: list[np.ndarray] = []
    row_labels: list[str] = []
    for sample, label in enumerate(labels):
        for video, kind, cmap in (
            (originals[sample], kinds[0], gray),
            (reconstructions[sample], kinds[1], gray),
            (errors[sample], "|error|", error_cmap),
        ):
            strips.append(cmap(np.clip(_strip(video, shown), 0.0, 1.0)))
            row_labels.append(f"{label} {kind}")
    mosaic, row_centres = _stack_strips(strips, samples=n_samples)

    # Each image pixel is shown at FRAME_INCHES / width inches, so any frame size gets the same on-page size.
    inches_per_pixel = FRAME_INCHES / width
    image_w, image_h = mosaic.shape[1] * inches_per_pixel, mosaic.shape[0] * inches_per_pixel
    left = _text_inches(row_labels, GRID_LABEL_POINTS) + 0.25
    top, bottom, colorbar_gap, colorbar_w, right = 0.75, 0.15, 0.15, 0.15, 0.55
    figure_w = left + image_w + colorbar_gap + colorbar_w + right
    figure_h = top + image_h + bottom
    figure = Figure(figsize=(figure_w, figure_h), dpi=DPI)
    axes = figure.add_axes((left / figure_w, bottom / figure_h, image_w / figure_w, image_h / figure_h))
    axes.imshow(mosaic, interpolation="nearest", aspect="auto")
    # The frame around the image would run across the white gaps and blur where frames start and end.
    axes.set_frame_on(False)
    axes.set_yticks(row_centres, row_labels, fontsize=GRID_LABEL_POINTS)
    axes.set_xticks(_frame_centres(shown, width), [f"t={frame}" for frame in shown] + ["max over t"], fontsize=8)
    axes.xaxis.tick_top()
    axes.tick_params(length=0)

    colorbar_axes = figure.add_axes(
        ((left + image_w + colorbar_gap) / figure_w, bottom / figure_h, colorbar_w / figure_w, image_h / figure_h)
    )
    colorbar = figure.colorbar(ScalarMappable(Normalize(0.0, 1.0), error_cmap), cax=colorbar_axes)
    colorbar.set_label("|error|", fontsize=9)
    colorbar.ax.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=12, y=1.0 - 0.1 / figure_h, va="top")
    return _png_bytes(figure)


def _stack_strips(strips: list[np.ndarray], samples: int) -> tuple[np.ndarray, list[float]]:
    """The RGBA strips one above the other, white rows between them (wider between samples),
    and the centre row of each strip."""
    per_sample = len(strips) // samples
    width = strips[0].shape[1]
    rows: list[np.ndarray] = []
    centres: list[float] = []
    top = 0
    for index, strip in enumerate(strips):
        if index:
            gap = PROJECTION_GAP_PIXELS if index % per_sample == 0 else FRAME_GAP_PIXELS
            rows.append(np.ones((gap, width, 4), dtype=strip.dtype))
            top += gap
        rows.append(strip)
        centres.append(top + (strip.shape[0] - 1) / 2)
        top += strip.shape[0]
    return np.concatenate(rows, axis=0), centres


def _frame_centres(shown: np.ndarray, width: int) -> list[float]:
    step = width + FRAME_GAP_PIXELS
    centres = [index * step + (width - 1) / 2 for index in range(len(shown))]
    centres.append((len(shown) - 1) * step + width + PROJECTION_GAP_PIXELS + (width - 1) / 2)
    return centres


def _text_inches(texts: Sequence[str], points: float) -> float:
    """Width of the widest text when drawn at `points`, from the font's metrics (nothing is rendered)."""
    font = FontProperties(size=points)
    widest = max(TEXT_TO_PATH.get_text_width_height_descent(text, font, ismath=False)[0] for text in texts)
    return widest / 72.0


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


def _with_gap_colour(name: str) -> Colormap:
    return colormaps[name].with_extremes(bad="white")


def _png_bytes(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = BytesIO()
    # No "Software" entry: the bytes then depend only on the inputs and the matplotlib version.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


# What the plot worker (job.plots.worker) can draw, by the name a request gives.
RENDERERS: dict[str, Callable[..., bytes]] = {
    "loss_curves": loss_curves_png,
    "reconstruction_grid": reconstruction_grid_png,
}
