"""Figures, CSV files and text of an :class:`~ssd_lightning.error_analysis.ErrorAnalysis`.

Files written by :func:`save` (into one folder, replaced on every call):

- ``pr_curves.png``: per-class precision-recall curves at IoU 0.5 and averaged over 0.5:0.95,
  with the mean over classes (whose area is the mAP); past 10 classes only the worst few are
  coloured and named.
- ``pr_curves.csv``: ``class, iou, recall, precision, score`` (score at IoU 0.5 only).
- ``confusion_matrix.png``: rows normalised by the true class (colour), counts in the cells
  while they fit.
- ``confusion_matrix.csv``: counts, and ``confusion_matrix_normalised.csv``: the row fractions;
  first row and column are ``background`` (false positives / missed objects).

Figures are matplotlib ``Figure`` objects built without pyplot (no global state), rendered once
by Agg into RGB arrays that both TensorBoard and the PNG files take.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ssd_lightning.error_analysis import ErrorAnalysis, normalise_rows

ALL_COLOURED = 10  # up to this many classes every PR curve gets its own colour and legend entry
ANNOTATED = 21  # up to this many rows the confusion matrix cells show their counts


def plot_pr_curves(analysis: ErrorAnalysis, highlight: int = 5, title: str = "") -> Figure:
    """Two panels (IoU 0.5, IoU 0.5:0.95) of per-class PR curves and their mean.

    Args:
        analysis: The evaluation's analysis.
        highlight: Past ``ALL_COLOURED`` classes, the number of lowest-AP classes drawn in
            colour (the others in grey, unnamed).
        title: Figure title (e.g. the epoch).
    """
    curves, names = analysis.curves, analysis.class_names
    many = len(names) > ALL_COLOURED
    worst = {name for name, *_ in analysis.worst_classes(highlight)} if many else set(names)
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panels = (
        ("IoU 0.5", curves.precision_50, curves.ap_50),
        ("IoU 0.5:0.95", curves.precision, curves.ap),
    )
    colours = _tab_colours(len(worst))
    for ax, (label, precision, ap) in zip(axes, panels, strict=True):
        coloured = 0
        for k, name in enumerate(names):
            if np.isnan(ap[k]):
                continue
            if name in worst:
                ax.plot(
                    curves.recall,
                    precision[k],
                    color=colours[coloured % len(colours)],
                    linewidth=1.5,
                    label=f"{name} ({ap[k]:.3f})",
                )
                coloured += 1
            else:
                ax.plot(curves.recall, precision[k], color="0.75", linewidth=0.7)
        defined = ~np.isnan(ap)
        if defined.any():
            mean = precision[defined].mean(axis=0)
            ax.plot(curves.recall, mean, "k--", linewidth=2, label=f"mean ({mean.mean():.3f})")
        ax.set_title(f"{label}: AP per class" + (f", {highlight} lowest named" if many else ""))
        ax.set_xlabel("recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("precision (interpolated, COCO 101 points)")
    if title:
        fig.suptitle(title)
    return fig


def plot_confusion_matrix(analysis: ErrorAnalysis, title: str = "") -> Figure:
    """The confusion matrix, rows normalised by the true class; counts in the cells while the
    matrix has at most ``ANNOTATED`` rows."""
    matrix, labels = analysis.matrix, analysis.labels
    fractions = normalise_rows(matrix)
    size = len(labels)
    side = min(max(5.0, 0.4 * size + 2.5), 20.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.nan_to_num(fractions), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the row (true class)")
    font = 9 if size <= 12 else 7 if size <= 40 else 6
    ax.set_xticks(
        range(size),
        labels,
        rotation=45 if size <= 12 else 90,
        fontsize=font,
        ha="right" if size <= 12 else "center",
        rotation_mode="anchor",
    )
    ax.set_yticks(range(size), labels, fontsize=font)
    ax.set_xlabel("predicted class (background: objects missed)")
    ax.set_ylabel("true class (background: false positives)")
    if size <= ANNOTATED:
        for (t, p), count in np.ndenumerate(matrix):
            if count:
                ink = "white" if fractions[t, p] > 0.5 else "black"
                ax.text(p, t, f"{count}", ha="center", va="center", color=ink, fontsize=font)
    heading = (
        f"confusion matrix at score >= {analysis.score_threshold:g}, "
        f"IoU >= {analysis.iou_threshold:g} (counts; colour: row fraction)"
    )
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    return fig


def _tab_colours(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def write_csvs(analysis: ErrorAnalysis, folder: str | Path) -> list[Path]:
    """``pr_curves.csv``, ``confusion_matrix.csv`` and ``confusion_matrix_normalised.csv``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    curves = analysis.curves
    pr_path = folder / "pr_curves.csv"
    with pr_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "iou", "recall", "precision", "score"])
        for k, name in enumerate(analysis.class_names):
            if np.isnan(curves.ap[k]):
                continue
            for r, recall in enumerate(curves.recall):
                score = curves.scores_50[k, r]
                writer.writerow(
                    [name, "0.50", f"{recall:.2f}", _num(curves.precision_50[k, r]), _num(score)]
                )
            for r, recall in enumerate(curves.recall):
                writer.writerow(
                    [name, "0.50:0.95", f"{recall:.2f}", _num(curves.precision[k, r]), ""]
                )
    paths = [pr_path]
    tables = {
        "confusion_matrix.csv": analysis.matrix,
        "confusion_matrix_normalised.csv": normalise_rows(analysis.matrix),
    }
    for name, table in tables.items():
        path = folder / name
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *analysis.labels])
            for label, row in zip(analysis.labels, table, strict=True):
                writer.writerow([label, *(_num(v) for v in row)])
        paths.append(path)
    return paths


def _num(value: float) -> str:
    """A CSV cell: integers as such, floats with 6 decimals, NaN empty."""
    if isinstance(value, int | np.integer):
        return str(int(value))
    return "" if np.isnan(value) else f"{float(value):.6f}"


def figures(analysis: ErrorAnalysis, title: str = "", highlight: int = 5) -> dict[str, Figure]:
    """``{"pr_curves": ..., "confusion_matrix": ...}`` figures."""
    return {
        "pr_curves": plot_pr_curves(analysis, highlight, title),
        "confusion_matrix": plot_confusion_matrix(analysis, title),
    }


def render(fig: Figure, dpi: int = 100) -> np.ndarray:
    """A figure drawn once into an RGB image (for TensorBoard's ``add_image`` and the PNG).

    Shape:
        (H, W, 3) uint8
    """
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def images(analysis: ErrorAnalysis, title: str = "", highlight: int = 5) -> dict[str, np.ndarray]:
    """The :func:`figures`, rendered: name -> (H, W, 3) uint8 RGB."""
    return {name: render(fig) for name, fig in figures(analysis, title, highlight).items()}


def save(
    analysis: ErrorAnalysis,
    folder: str | Path,
    drawn: Mapping[str, np.ndarray] | None = None,
) -> list[Path]:
    """Write the PNG and CSV files into ``folder``; returns their paths.

    Args:
        analysis: The evaluation's analysis.
        folder: Created if needed.
        drawn: The :func:`images` already rendered (e.g. for TensorBoard); rendered otherwise.
    """
    folder = Path(folder)
    paths = write_csvs(analysis, folder)
    for name, rgb in (drawn or images(analysis)).items():
        path = folder / f"{name}.png"
        Image.fromarray(rgb).save(path, compress_level=1)  # fast: flat colours compress anyway
        paths.append(path)
    return paths


def format_report(analysis: ErrorAnalysis, top: int = 5) -> str:
    """Text: the ``top`` classes of lowest AP and the ``top`` most confused class pairs, with
    each class's missed objects and false positives from the confusion matrix."""
    matrix = analysis.matrix
    objects = matrix[1:].sum(axis=1)
    missed, false_pos = matrix[1:, 0], matrix[0, 1:]
    names = analysis.class_names
    width = max([len(n) for n in names] + [len("predicted as"), 5])
    lines = [
        f"worst classes (lowest COCO AP; missed objects and false positives at score >= "
        f"{analysis.score_threshold:g}, IoU >= {analysis.iou_threshold:g}):",
        f"  {'class':<{width}}  {'AP':>6}  {'AP50':>6}  {'objects':>7}  {'missed':>13}  "
        f"{'false pos':>9}",
    ]
    for name, ap, ap_50 in analysis.worst_classes(top):
        k = names.index(name)
        share = missed[k] / objects[k] if objects[k] else 0.0
        lines.append(
            f"  {name:<{width}}  {ap:6.3f}  {ap_50:6.3f}  {objects[k]:7d}  "
            f"{missed[k]:6d} ({share:4.0%})  {false_pos[k]:9d}"
        )
    pairs = analysis.confused_pairs(top)
    lines.append("most confused pairs (true class detected as another class):")
    if not pairs:
        lines.append("  none")
    else:
        lines.append(
            f"  {'true class':<{width}}  {'predicted as':<{width}}  {'count':>6}  {'of true':>7}"
        )
    for pair in pairs:
        lines.append(
            f"  {pair.true:<{width}}  {pair.predicted:<{width}}  {pair.count:6d}  "
            f"{pair.fraction:7.1%}"
        )
    return "\n".join(lines)
